"""Score a folder (or jsonl list) of generated images with one or more rewards (``genalign score``).

Input layouts:

- a folder with ``prompts.jsonl`` or ``metadata.jsonl`` (one JSON object per line with ``file_name`` and
  ``prompt``; the Hugging Face ``imagefolder`` convention), paths relative to the folder;
- a ``.jsonl`` file with the same fields, paths relative to the file's folder;
- a folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``) with optional sidecar ``<stem>.txt`` prompts.

Unreadable images are skipped and counted (``skipped``), never silently scored as blanks. Instance rewards give
one value per image; set rewards (Vendi, dataset FAD) give one value for the whole set (in ``mean`` and
``set``), computed from the embeddings gathered over all batches.

Source: genalign's own (data conventions of ``shared/methods/README.md`` §6).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from genalign.rewards.composite import RewardSpec, _build_reward

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_FILE_KEYS = ("file_name", "file", "image", "path")
_PROMPT_KEYS = ("prompt", "caption", "text")


def _read_jsonl(path: Path) -> list[tuple[Path, str | None]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            obj = json.loads(line)
            file_key = next((k for k in _FILE_KEYS if k in obj), None)
            if file_key is None:
                raise ValueError(f"{path}:{i}: no file field (one of {_FILE_KEYS})")
            prompt = next((obj[k] for k in _PROMPT_KEYS if k in obj), None)
            rows.append((path.parent / obj[file_key], prompt))
    return rows


def collect_samples(folder_or_jsonl: str | Path) -> list[tuple[Path, str | None]]:
    """List ``(image_path, prompt_or_None)`` in a stable order from any supported layout.

    Raises:
        FileNotFoundError: the path does not exist. ValueError: a jsonl line without a file field.
    """
    p = Path(folder_or_jsonl)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_file():
        return _read_jsonl(p)
    for name in ("prompts.jsonl", "metadata.jsonl"):
        if (p / name).exists():
            return _read_jsonl(p / name)
    rows = []
    for img in sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES):
        txt = img.with_suffix(".txt")
        rows.append((img, txt.read_text(encoding="utf-8").strip() if txt.exists() else None))
    return rows


def load_image(path: Path) -> torch.Tensor:
    """Read an image as ``(3, H, W)`` float32 in [0, 1] (RGB). Raises ``OSError``/``ValueError`` if unreadable."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def _batches(items: list[tuple[Path, str | None, torch.Tensor]], batch_size: int):
    # consecutive images of equal size share a batch; a size change flushes
    cur: list = []
    for it in items:
        if cur and (len(cur) >= batch_size or cur[0][2].shape != it[2].shape):
            yield cur
            cur = []
        cur.append(it)
    if cur:
        yield cur


def score_samples(folder_or_jsonl: str | Path, specs: list[RewardSpec | dict | str], batch_size: int = 8,
                  device: str | torch.device | None = None, **common_kwargs: Any) -> dict:
    """Score every image with every reward in ``specs`` (raw scores: weights/normalisation are not applied).

    Args:
        folder_or_jsonl: see the module docstring.
        specs: rewards to run (``RewardSpec``, dicts or names); the reward's registered name is the column name
            (a repeated name gets ``#2``...).
        batch_size: images per forward pass.
        device: device for the rewards and images.
        common_kwargs: passed to every reward constructor that accepts them (e.g. ``tiny=True`` in tests).

    Returns:
        ``{"per_sample": [{"file": str, "prompt": str | None, "<reward>": float, ...}],
        "mean": {"<reward>": float}, "skipped": int, "set": {"<set reward>": float}}``. Set rewards appear in
        ``mean`` and ``set`` only. Missing prompts are passed as ``""`` (and logged).

    Raises:
        FileNotFoundError: missing input. KeyError: unknown reward name.
    """
    rows = collect_samples(folder_or_jsonl)
    names: list[str] = []
    rewards = []
    for raw in specs:
        spec = RewardSpec.coerce(raw)
        name, i = spec.name, 2
        while name in names:
            name, i = f"{spec.name}#{i}", i + 1
        names.append(name)
        rewards.append(_build_reward(spec.name, spec.kwargs, common_kwargs, device))

    loaded, skipped = [], 0
    for path, prompt in rows:
        try:
            loaded.append((path, prompt, load_image(path)))
        except Exception as err:  # unreadable / missing file: count and continue
            skipped += 1
            logger.warning("skipping unreadable image %s (%s)", path, type(err).__name__)
    if skipped:
        logger.warning("skipped %d unreadable image(s) of %d", skipped, len(rows))
    missing_prompts = sum(p is None for _, p, _ in loaded)
    if missing_prompts:
        logger.warning("%d image(s) have no prompt; scoring them with an empty prompt", missing_prompts)

    per_sample: list[dict] = []
    set_emb: dict[str, list[torch.Tensor]] = {n: [] for n, r in zip(names, rewards) if r.kind == "set"}
    for batch in _batches(loaded, batch_size):
        x = torch.stack([b[2] for b in batch])
        if device is not None:
            x = x.to(device)
        prompts = [b[1] or "" for b in batch]
        recs = [{"file": str(b[0]), "prompt": b[1]} for b in batch]
        for name, reward in zip(names, rewards):
            with torch.no_grad():
                if reward.kind == "set":
                    set_emb[name].append(reward.embed(x).detach().cpu())
                    continue
                vals = reward.score(x, prompts).float().cpu().reshape(-1).tolist()
            for rec, v in zip(recs, vals):
                rec[name] = float(v)
        per_sample.extend(recs)

    mean: dict[str, float] = {}
    set_values: dict[str, float] = {}
    for name, reward in zip(names, rewards):
        if reward.kind == "set":
            embs = set_emb[name]
            val = float(reward.score_embeddings(torch.cat(embs))) if embs else math.nan
            set_values[name] = mean[name] = val
        else:
            vals = [r[name] for r in per_sample if name in r]
            mean[name] = float(sum(vals) / len(vals)) if vals else math.nan
    return {"per_sample": per_sample, "mean": mean, "skipped": skipped, "set": set_values}


def write_scores(result: dict, out_path: str | Path) -> Path:
    """Write ``result["per_sample"]`` as ``.jsonl`` (one object per line) or ``.csv`` (``file``, ``prompt``, one
    column per reward); ``.json`` writes the whole result.

    Raises:
        ValueError: another suffix.
    """
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = result.get("per_sample", [])
    suffix = out.suffix.lower()
    if suffix == ".jsonl":
        with open(out, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    elif suffix == ".csv":
        cols = ["file", "prompt"]
        for r in rows:
            cols += [k for k in r if k not in cols]
        with open(out, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    elif suffix == ".json":
        out.write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    else:
        raise ValueError(f"unsupported output suffix {out.suffix!r}: use .jsonl, .csv or .json")
    return out


__all__ = ["collect_samples", "load_image", "score_samples", "write_scores"]
