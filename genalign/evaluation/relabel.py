"""Re-label preference pairs with a reward (``genalign relabel``): the image with the higher reward becomes chosen.

Source: genalign's own (data conventions of ``shared/methods/README.md`` §6); rows read with
:mod:`genalign.data.preference`.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from genalign.rewards.composite import RewardItem, build_reward, coerce_spec

logger = logging.getLogger(__name__)


def relabel_pairs(source: str | Path, spec: RewardItem | dict | str, out: str | Path, batch_size: int = 8,
                  split: str = "train", max_pairs: int | None = None, device: str | torch.device | None = None,
                  progress: bool = False, **common_kwargs: Any) -> dict:
    """Re-label a preference dataset's pairs with a reward: the image with the higher reward becomes ``chosen``.

    Reads every row with :mod:`genalign.data.preference`'s reader (genalign jsonl + images, or Pick-a-Pic
    parquet / arrow with ``caption, jpg_0, jpg_1, label_0``), scores both images of each pair at their stored
    resolution, and writes genalign's jsonl schema ``{"prompt", "chosen", "rejected", "label": 1.0,
    "reward_chosen", "reward_rejected", "reward", "agrees"}`` to ``out``. Image paths: jsonl sources keep the
    original files (paths made relative to ``out``'s folder); encoded images (Pick-a-Pic) are written unchanged to
    ``<out stem>_images/``. The output reads back with :func:`genalign.data.preference.load_preference_pairs`.

    Pairs with equal rewards are dropped and counted (``ties``); so are rows without a prompt or with an
    unreadable image. ``agrees`` is whether the reward picks the originally preferred image (``None`` when the
    original was a tie).

    Args:
        source: jsonl file, folder with a jsonl / parquet / arrow data, or a ``datasets`` hub id.
        spec: one instance image reward (name, dict or ``RewardItem``).
        out: output ``.jsonl`` path.
        batch_size: pairs per forward pass (pairs of equal image size are batched; 2·batch_size images).
        max_pairs: stop after this many source rows.

    Returns:
        ``{"out": Path, "pairs": int, "ties": int, "flipped": int, "agreement": float (fraction of written pairs
        with a decided original label where the reward agrees; nan if none), "unreadable_images": int,
        "bad_rows": int}``.

    Raises:
        ValueError: ``out`` not ``.jsonl``, or a set / non-image reward. KeyError: unknown reward.
        FileNotFoundError: missing source.
    """
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    from genalign.data.preference import decode_image, iter_source_rows

    out = Path(out)
    if out.suffix.lower() != ".jsonl":
        raise ValueError(f"relabel output must be .jsonl, got {out.name!r}")
    spec = coerce_spec(spec)
    reward = build_reward(spec.name, spec.kwargs, common_kwargs, device)
    if reward.kind == "set" or reward.modality != "image":
        raise ValueError(f"relabel needs an instance image reward; {spec.name!r} is a {reward.kind} "
                         f"{reward.modality} reward")
    out.parent.mkdir(parents=True, exist_ok=True)
    img_dir = out.parent / f"{out.stem}_images"
    stats = {"pairs": 0, "ties": 0, "flipped": 0, "unreadable_images": 0, "bad_rows": 0}
    agree_n = agree_yes = 0

    def ref(data, i: int, k: int, img: Image.Image) -> str:
        """Path of the image as written into the output (relative to out's folder)."""
        if isinstance(data, (str, os.PathLike)):
            try:
                return os.path.relpath(Path(data).resolve(), out.parent.resolve())
            except ValueError:  # another drive (Windows)
                return str(Path(data).resolve())
        img_dir.mkdir(exist_ok=True)
        raw = data.get("bytes") if isinstance(data, dict) else data
        if isinstance(raw, (bytes, bytearray)):
            fmt = (Image.open(io.BytesIO(raw)).format or "png").lower()
            name = f"{i:07d}_{k}.{'jpg' if fmt == 'jpeg' else fmt}"
            (img_dir / name).write_bytes(raw)
        else:
            name = f"{i:07d}_{k}.png"
            img.save(img_dir / name)
        return f"{img_dir.name}/{name}"

    def to_x(img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0

    pending: list[dict] = []

    def flush(f) -> None:
        nonlocal agree_n, agree_yes
        if not pending:
            return
        x = torch.stack([to_x(p["img"][k]) for p in pending for k in (0, 1)])
        texts = [p["prompt"] for p in pending for _ in (0, 1)]
        if device is not None:
            x = x.to(device)
        s = reward.score(x, texts).float().cpu().reshape(-1, 2)
        for p, (s0, s1) in zip(pending, s.tolist()):
            if s0 == s1:
                stats["ties"] += 1
                continue
            w = 0 if s0 > s1 else 1
            agrees = None if p["orig"] is None else (w == p["orig"])
            if agrees is not None:
                agree_n += 1
                agree_yes += bool(agrees)
                stats["flipped"] += not agrees
            row = {"prompt": p["prompt"], "chosen": ref(p["data"][w], p["i"], w, p["img"][w]),
                   "rejected": ref(p["data"][1 - w], p["i"], 1 - w, p["img"][1 - w]), "label": 1.0,
                   "reward_chosen": [s0, s1][w], "reward_rejected": [s0, s1][1 - w], "reward": spec.name,
                   "agrees": agrees}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            stats["pairs"] += 1
        pending.clear()

    bar = tqdm(desc=f"relabel ({spec.name})", unit="pair", disable=not progress, dynamic_ncols=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, row in enumerate(iter_source_rows(str(source), split)):
            if max_pairs and i >= max_pairs:
                break
            bar.update(1)
            if "_bad" in row:
                stats["bad_rows"] += 1
                continue
            if "jpg_0" in row:  # Pick-a-Pic: label_0 = 1 → image 0 won, 0.5 tie
                l0 = float(row.get("label_0", 0.5))
                prompt, data, orig = row.get("caption"), (row["jpg_0"], row["jpg_1"]), None if l0 == 0.5 else int(l0 == 0)
            elif "chosen" in row and "rejected" in row:
                base = row["_base"]
                prompt, data = row.get("prompt"), (base / row["chosen"], base / row["rejected"])
                orig = None if float(row.get("label", 1.0)) == 0.5 else 0
            else:
                stats["bad_rows"] += 1
                continue
            if prompt is None:
                stats["bad_rows"] += 1
                continue
            try:
                imgs = (decode_image(data[0]), decode_image(data[1]))
            except Exception:  # any decoder error: skip and count
                stats["unreadable_images"] += 1
                continue
            item = {"i": i, "prompt": prompt, "data": data, "img": imgs, "orig": orig}
            if imgs[0].size != imgs[1].size:  # score the loser-candidate at the other's size (MaPO convention)
                item["img"] = (imgs[0], imgs[1].resize(imgs[0].size))
            if pending and (len(pending) >= batch_size or pending[0]["img"][0].size != item["img"][0].size):
                flush(f)
            pending.append(item)
        flush(f)
    bar.close()
    tmp.replace(out)
    if stats["ties"]:
        logger.warning("relabel: dropped %d tied pair(s) (equal %s)", stats["ties"], spec.name)
    return {"out": out, **stats, "agreement": agree_yes / agree_n if agree_n else math.nan}
