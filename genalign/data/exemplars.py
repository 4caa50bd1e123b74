"""Sets of real examples: exemplars for instance-to-set and set rewards (DRAGON's "learn from examples",
dragon.md §3), and the real samples DDO contrasts with its reference's samples (:func:`load_real_samples`).

An exemplar set is the reference a distribution reward compares generations with: a tensor of images
``(M, 3, H, W)`` in [0, 1], a tensor of waveforms ``(M, C, T)``, or a list of captions (embedded with a text tower,
cross-modal). Specs: ``digits:thick`` | ``digits:thin`` (the quarter of the real training digits with the most /
least ink) | ``digits:train`` | ``digits:test`` | ``digits:all`` | ``digits:<0-9>`` | an image folder
(``metadata.jsonl``) | an audio folder | a ``.txt`` file of captions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from genalign.data.audio import AUDIO_SUFFIXES, load_audio_data, load_exemplar_folder, load_music_split
from genalign.data.digits import load_digits_split
from genalign.data.images import load_image_data
from genalign.pipelines.base import cond_to, index_cond

__all__ = ["thick_digits", "load_exemplars", "load_real_samples", "LatentRows"]


def thick_digits(fraction: float = 0.25, thin: bool = False, split: str = "train") -> torch.Tensor:
    """Real digits with the most (or least, ``thin``) ink: the top ``fraction`` by mean intensity, ``(M, 3, 8, 8)``
    (at least 2 images). An exemplar subset for the digits demo of instance-to-set / set rewards."""
    x, _ = load_digits_split(split)
    ink = x.mean(dim=(1, 2, 3))
    order = ink.argsort(descending=not thin)
    return x[order[: max(2, int(len(x) * fraction))]]


def load_exemplars(spec: str, resolution: int | None = None, sample_rate: int | None = None):
    """An exemplar set from a spec (module docstring).

    Args:
        spec: the exemplar spec.
        resolution: image side for image folders (default 8, the digits demo).
        sample_rate: target rate for audio folders (default 44.1 kHz).

    Returns:
        ``(M, 3, H, W)`` images in [0, 1], ``(M, C, T)`` waveforms, or a list of M captions.

    Raises:
        FileNotFoundError: no such file / folder. ValueError: an unknown ``digits:`` spec or an empty caption file.
    """
    if spec.startswith("digits:"):
        what = spec.split(":", 1)[1]
        if what in ("thick", "thin"):
            return thick_digits(thin=what == "thin")
        if what.isdigit() and len(what) == 1:
            x, y = load_digits_split("train")
            return x[y == int(what)]
        if what in ("train", "test", "all"):
            return load_digits_split(what)[0]
        raise ValueError(f"exemplars: unknown digits spec {spec!r} (thick, thin, train, test, all, 0-9)")
    p = Path(spec)
    if p.suffix == ".txt":
        if not p.exists():
            raise FileNotFoundError(f"exemplars: {spec!r} not found")
        texts = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
        if not texts:
            raise ValueError(f"exemplars: {spec!r} has no caption")
        return texts
    if not p.exists():
        raise FileNotFoundError(f"exemplars: {spec!r} not found")
    if p.is_dir() and any(f.suffix.lower() in AUDIO_SUFFIXES for f in p.iterdir()):
        return load_exemplar_folder(p, sample_rate=sample_rate or 44_100).waveforms
    return load_image_data(str(p), resolution or 8).images


def load_real_samples(model, source, seed: int = 0) -> tuple[torch.Tensor, list[str], dict[str, int]]:
    """Real samples with captions for the adapter's modality (DDO's real data, ``data.source`` ``kind: images``).

    Args:
        model: the adapter; ``family == "audio"`` reads audio clips at ``model.sample_rate`` with
            ``model.audio_channels`` channels, cropped / zero-padded to the denoiser's window (``model.clip_samples``),
            else images at ``model.resolution``.
        source: an :class:`~genalign.config.ImagesData` (``source``: ``digits:train``, an image folder with
            ``metadata.jsonl``, a parquet folder / hub id; or for audio a folder / jsonl of ``{"file_name" |
            "audio", "prompt"}`` rows, or ``music:train`` — the built-in demo's real clips,
            :func:`~genalign.data.audio.load_music_split`), with ``max_images`` capping the rows.
        seed: image loader seed (digits split, flips).

    Returns:
        ``(samples, prompts, skipped)``: images ``(N, 3, H, W)`` in [0, 1] or waveforms ``(N, C, T)`` in [−1, 1],
        N captions, and counts of skipped rows.

    Raises:
        FileNotFoundError / ValueError: as :func:`~genalign.data.images.load_image_data` /
        :func:`~genalign.data.audio.load_audio_data`.
    """
    if getattr(model, "family", None) == "audio" and str(source.source).startswith("music:"):
        data = load_music_split(source.source, model.sample_rate, channels=model.audio_channels,
                                num_samples=model.clip_samples, max_items=source.max_images)
        return data.waveforms, list(data.prompts), dict(data.skipped)
    if getattr(model, "family", None) == "audio":
        data = load_audio_data(source.source, model.sample_rate, channels=model.audio_channels,
                               num_samples=model.clip_samples, max_items=source.max_images)
        return data.waveforms, list(data.prompts), dict(data.skipped)
    data = load_image_data(source.source, getattr(model, "resolution", None) or 8, image_column=source.image_column,
                           caption_column=source.caption_column, max_images=source.max_images, hflip=source.hflip,
                           seed=seed)
    return data.images, list(data.prompts), dict(data.skipped)


class LatentRows:
    """Real rows as model inputs: cached latents ``(N, ...)`` (CPU), their prompts and conditioning (N rows).

    ``batch(idx)`` → ``{"latents", "cond", "ids"}`` on the model's device (DDO's real data; ``n`` rows,
    ``skipped`` counts of dropped source rows, ``images`` the decoded real images when available).
    """

    def __init__(self, model, latents: torch.Tensor, prompts: list[str], cond: dict[str, Any],
                 skipped: dict[str, int] | None = None, images: torch.Tensor | None = None):
        self.model, self.latents, self.prompts, self.cond = model, latents, list(prompts), cond
        self.images = images
        self.n = latents.shape[0]
        self.skipped = dict(skipped or {})

    def batch(self, idx: torch.Tensor) -> dict[str, Any]:
        dev = self.model.device
        return {"latents": self.latents[idx].to(dev), "cond": cond_to(index_cond(self.cond, idx), dev),
                "ids": idx.tolist()}
