"""Real images with captions and optional condition images (DDO's real data; Ctrl-U's image/condition pairs).

Sources (``data.source`` with ``kind: images``):

- ``digits:train`` / ``digits:test``: scikit-learn's real digits with a random digit prompt per image;
- a folder with ``metadata.jsonl`` rows ``{"file_name", "prompt", "condition"?}`` (paths relative to the folder);
- a parquet folder or a `datasets` hub id with ``image_column`` / ``caption_column`` / ``condition_column``.

Unreadable images and rows without a caption are skipped and counted (``ImageData.skipped``), never a crash.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from genalign.data.preference import decode_image, resize_center_crop

logger = logging.getLogger(__name__)


@dataclass
class ImageData:
    """Decoded images ``(N, 3, H, W)`` in [0, 1], their prompts, optional conditions ``(N, 3, H, W)`` in [0, 1]."""

    images: torch.Tensor
    prompts: list[str]
    conditions: torch.Tensor | None = None
    labels: torch.Tensor | None = None  # digits only: the true digit
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)


def _digits(split: str, resolution: int, seed: int) -> ImageData:
    import torch.nn.functional as F

    from genalign.data.digits import TRAIN_TEMPLATES, digit_prompt, load_digits_split

    x, y = load_digits_split(split)
    if resolution != x.shape[-1]:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False).clamp(0, 1)
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, len(TRAIN_TEMPLATES), (len(y),), generator=g).tolist()
    prompts = [digit_prompt(TRAIN_TEMPLATES[i], int(d)) for i, d in zip(t, y.tolist())]
    return ImageData(x, prompts, None, y, {})


def load_image_data(source: str, resolution: int, image_column: str = "image", caption_column: str = "prompt",
                    condition_column: str | None = None, max_images: int | None = None, hflip: bool = False,
                    split: str = "train", seed: int = 0) -> ImageData:
    """Load an image dataset (see module docstring) resized / centre-cropped to ``resolution``.

    Raises:
        FileNotFoundError: a folder without ``metadata.jsonl`` / parquet files, or an unavailable hub id.
        ValueError: no usable image at all.
    """
    if source.startswith("digits:"):
        data = _digits(source.split(":", 1)[1], resolution, seed)
        if max_images:
            data = ImageData(data.images[:max_images], data.prompts[:max_images], None, data.labels[:max_images], {})
        return data
    path = Path(source)
    rows, base = [], None
    if (path / "metadata.jsonl").exists() or path.suffix == ".jsonl":
        meta = path / "metadata.jsonl" if path.is_dir() else path
        base = meta.parent
        bad = 0
        for line in meta.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
        image_column = "file_name" if rows and "file_name" in rows[0] else image_column
        skipped = {"bad_rows": bad}
    else:
        try:
            import datasets
        except ImportError:
            raise ImportError("data.source: reading parquet / hub image datasets needs `pip install datasets`") from None
        files = sorted(str(p) for p in path.rglob("*.parquet")) if path.is_dir() else []
        try:
            ds = (datasets.load_dataset("parquet", data_files=files, split="train") if files
                  else datasets.load_dataset(source, split=split))
        except Exception as err:
            raise FileNotFoundError(f"data.source: cannot load {source!r} ({type(err).__name__}); give a folder with "
                                    "metadata.jsonl or parquet files, or allow network access") from None
        rows, skipped = ds, {"bad_rows": 0}
    skipped.update({"unreadable_images": 0, "missing_caption": 0})
    images, prompts, conds = [], [], []
    g = torch.Generator().manual_seed(seed)
    for row in rows:
        if max_images and len(images) >= max_images:
            break
        prompt = row.get(caption_column) if isinstance(row, dict) else None
        if prompt is None:
            skipped["missing_caption"] += 1
            continue
        try:
            img = decode_image(base / row[image_column] if base else row[image_column])
            cond = None
            if condition_column:
                c = row[condition_column]
                cond = decode_image(base / c if base else c)
        except Exception:  # any decoder error: skip and count
            skipped["unreadable_images"] += 1
            continue
        flip = bool(hflip and torch.rand(1, generator=g).item() < 0.5)
        images.append(resize_center_crop(img, resolution, flip)[0])
        if cond is not None:
            conds.append(resize_center_crop(cond, resolution, flip)[0])
        prompts.append(prompt)
    for k, v in skipped.items():
        if v:
            logger.warning("data.source %s: skipped %d rows (%s)", source, v, k.replace("_", " "))
    if not images:
        raise ValueError(f"data.source {source!r}: no usable image (skipped: {skipped})")
    return ImageData(torch.stack(images), prompts, torch.stack(conds) if conds else None, None, skipped)
