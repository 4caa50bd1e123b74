"""Preference pairs: Pick-a-Pic v2 schema (parquet / arrow / hub id) or jsonl + image folder → tensors.

Pick-a-Pic schema: ``caption, jpg_0, jpg_1, label_0, label_1`` (encoded image bytes; label 1 = won, 0.5 = tie).
genalign's jsonl schema: ``{"prompt", "chosen", "rejected"}`` (image paths relative to the jsonl file) with an
optional ``label`` (0.5 = tie). Ties are dropped by default (``ties: error`` raises instead); the winner is put
first; undecodable images are skipped and counted — never a crash halfway through an epoch.

Source: MaPO ``train.py`` L278–279 / ``utils.py`` L218–224 and Diffusion-DPO ``train.py`` L855–863 (tie filter,
winner first).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)


@dataclass
class PreferencePairs:
    """Decoded pairs: ``chosen`` / ``rejected`` float ``(N, 3, H, W)`` in [0, 1], prompts, SDXL size info, counts."""

    prompts: list[str]
    chosen: torch.Tensor
    rejected: torch.Tensor
    original_sizes: torch.Tensor  # (N, 2) (h, w) of the chosen image before resizing
    crop_top_lefts: torch.Tensor  # (N, 2)
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)


def _decode(data) -> Image.Image:
    if isinstance(data, Image.Image):
        return data.convert("RGB")
    if isinstance(data, dict) and "bytes" in data:
        data = data["bytes"]
    if isinstance(data, (bytes, bytearray)):
        img = Image.open(io.BytesIO(data))
    else:
        img = Image.open(data)
    img.load()
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, resolution: int, hflip: bool = False) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Shorter side → ``resolution`` (bilinear), centre crop, optional flip → ``(3, r, r)`` in [0, 1].

    Returns the tensor, the original (h, w) and the crop (top, left) for SDXL micro-conditioning.
    """
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    if hflip:
        x = x.flip(-1)
    return x, (h, w), (top, left)


def _rows_from_source(source: str, split: str):
    """Yield dict rows (Pick-a-Pic or jsonl schema) with a ``_base`` dir for relative image paths."""
    path = Path(source)
    jsonl = path if path.suffix == ".jsonl" else None
    if path.is_dir() and not jsonl:
        cands = sorted(path.glob("*.jsonl"))
        if cands:
            jsonl = cands[0]
    if jsonl is not None:
        if not jsonl.exists():
            raise FileNotFoundError(f"data.source: {str(jsonl)!r} not found")
        for i, line in enumerate(jsonl.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                yield {"_bad": f"line {i + 1}: not JSON"}
                continue
            row["_base"] = jsonl.parent
            yield row
        return
    try:
        import datasets
    except ImportError:
        raise ImportError("data.source: reading parquet/arrow/hub datasets needs `pip install datasets`") from None
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*.parquet"))
        ds = datasets.load_dataset("parquet", data_files=files, split="train") if files else datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    else:
        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as err:
            raise FileNotFoundError(
                f"data.source: cannot load {source!r} ({type(err).__name__}); give a local folder of parquet/arrow "
                "files or a jsonl file, or allow network access to the Hugging Face Hub"
            ) from None
    for row in ds:
        yield row


def load_preference_pairs(source: str, resolution: int, split: str = "train", ties: str = "drop",
                          max_pairs: int | None = None, hflip: bool = False, pair_augment: str = "joint",
                          seed: int = 0) -> PreferencePairs:
    """Read, filter and decode preference pairs.

    Args:
        source: jsonl file, folder with a jsonl / parquet / arrow data, or a `datasets` hub id.
        resolution: output size in pixels (shorter-side resize + centre crop).
        ties: "drop" (count and skip) or "error" (raise on the first tie).
        hflip: random horizontal flips (frozen at load time, as latents are cached); ``pair_augment`` "joint"
            flips both images of a pair together (MaPO / diffusers), "independent" each on its own (SF-DPO).

    Raises:
        ValueError: a tie with ``ties="error"``, or no usable pair at all.
    """
    g = np.random.default_rng(seed)
    prompts, chosen, rejected, sizes, crops = [], [], [], [], []
    skipped = {"ties": 0, "unreadable_images": 0, "bad_rows": 0}
    for row in _rows_from_source(source, split):
        if max_pairs and len(prompts) >= max_pairs:
            break
        if "_bad" in row:
            skipped["bad_rows"] += 1
            continue
        if "jpg_0" in row:  # Pick-a-Pic schema
            l0 = float(row.get("label_0", 0.5))
            prompt, img_w, img_l = row.get("caption"), row["jpg_0"], row["jpg_1"]
            if l0 == 0.5:
                label = 0.5
            else:
                label = 1.0
                if l0 == 0:  # winner first
                    img_w, img_l = img_l, img_w
        elif "chosen" in row and "rejected" in row:
            prompt, label = row.get("prompt"), float(row.get("label", 1.0))
            base = row["_base"]
            img_w, img_l = base / row["chosen"], base / row["rejected"]
        else:
            skipped["bad_rows"] += 1
            continue
        if prompt is None:
            skipped["bad_rows"] += 1
            continue
        if label == 0.5:
            if ties == "error":
                raise ValueError(f"data.source {source!r}: tie in preference labels for prompt {prompt!r} (ties: error)")
            skipped["ties"] += 1
            continue
        try:
            pw, pl = _decode(img_w), _decode(img_l)
        except Exception:  # any decoder error: skip and count
            skipped["unreadable_images"] += 1
            continue
        if pl.size != pw.size:  # MaPO resizes the loser to the winner's size first
            pl = pl.resize(pw.size)
        flip_w = bool(hflip and g.random() < 0.5)
        flip_l = flip_w if pair_augment == "joint" else bool(hflip and g.random() < 0.5)
        xw, size, crop = resize_center_crop(pw, resolution, flip_w)
        xl, _, _ = resize_center_crop(pl, resolution, flip_l)
        prompts.append(prompt)
        chosen.append(xw)
        rejected.append(xl)
        sizes.append(size)
        crops.append(crop)
    for k, v in skipped.items():
        if v:
            logger.warning("data.source %s: skipped %d %s", source, v, k.replace("_", " "))
    if not prompts:
        raise ValueError(f"data.source {source!r}: no usable preference pair (skipped: {skipped})")
    return PreferencePairs(prompts, torch.stack(chosen), torch.stack(rejected), torch.tensor(sizes),
                           torch.tensor(crops), skipped)
