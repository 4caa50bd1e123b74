"""Seeded row order and streamed preference batches.

The rows of global micro-step m on rank r are a pure function of (seed, m, r) (:func:`micro_batch_indices`), so
a resumed run sees exactly the batches an uninterrupted one would. Everything random that a batch carries (flip,
crop, caption dropout, the VAE posterior draw) is seeded by the row's position in that stream, never by a
process-global generator, so DataLoader workers, resumes and ranks agree.

:class:`StreamedPairs` decodes, resizes and crops a micro-batch's images in DataLoader worker processes
(``data.num_workers``; prefetching the next micro-steps) from a lazy :class:`~genalign.data.preference.
PreferenceSource`, then runs the VAE and text encoders on the model's device: memory and time to the first step
do not grow with the number of pairs.
"""

from __future__ import annotations

import itertools
import logging
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from genalign.data.preference import PreferenceSource, prepare_pair

logger = logging.getLogger(__name__)

# Seed offsets so the data's random streams never coincide with the trainer's noise generators.
_AUG_STREAM, _LATENT_STREAM, _DROPOUT_STREAM = 11, 13, 17


# -- the seeded row order --------------------------------------------------------------------------------------
def row_offset(micro_step: int, batch_size: int, rank: int, world: int) -> int:
    """Position in the row stream where this rank's micro-batch starts (also seeds its noise, so N ranks with
    accumulation A and one rank with accumulation N·A see the same rows *and* the same noise)."""
    return micro_step * batch_size * world + rank * batch_size


@lru_cache(maxsize=4)
def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def micro_batch_indices(n: int, micro_step: int, batch_size: int, rank: int, world: int, seed: int) -> torch.Tensor:
    """Indices of this rank's rows for a global micro-step: an endless stream of seeded epoch permutations, cut
    into global batches of ``batch_size × world`` rows; rank r takes the r-th slice. A pure function (exact resume).

    Returns a long tensor ``(batch_size,)`` of row numbers in ``[0, n)``.
    """
    start = row_offset(micro_step, batch_size, rank, world)
    out = []
    while len(out) < batch_size:
        epoch, pos = divmod(start + len(out), n)
        perm = _epoch_perm(n, seed, epoch)
        take = min(batch_size - len(out), n - pos)
        out.extend(perm[pos:pos + take].tolist())
    idx = torch.tensor(out)
    # Why: with few rows two micro-steps can draw the same rows, so rows alone do not identify the step; the tag
    # lets a data object seed its augmentation / latent draws by the exact step (see stream_position).
    idx.stream = (n, micro_step, batch_size, rank, world, seed)
    return idx


def stream_position(idx, n: int, batch_size: int, rank: int, world: int, seed: int, hint: int | None = None,
                    max_micro_steps: int = 10**7) -> int | None:
    """The micro-step ``idx`` was drawn for: read from the tag :func:`micro_batch_indices` puts on its result when
    the stream parameters match, else found by :func:`locate_micro_step` (None: not a micro-batch of this stream)."""
    tag = getattr(idx, "stream", None)
    if tag is not None and tag[0] == n and tuple(tag[2:]) == (batch_size, rank, world, seed):
        return tag[1]
    return locate_micro_step(n, idx, batch_size, rank, world, seed, hint, max_micro_steps)


def locate_micro_step(n: int, idx, batch_size: int, rank: int, world: int, seed: int, hint: int | None = None,
                      max_micro_steps: int = 10**7) -> int | None:
    """The first micro-step m with ``micro_batch_indices(n, m, ...) == idx``, or None if ``idx`` is not from the
    stream. (With n small two steps can draw the same rows: then the earliest is returned — prefer the exact tag
    read by :func:`stream_position`.)

    Tries ``hint`` first (the step after the last one served), else inverts the permutation of each epoch in turn
    (the first row of a micro-batch sits at stream position ``m·B·world + rank·B``). Lets a data object seed a
    batch by its stream position while the trainer keeps calling ``batch(idx)``.
    """
    idx = [int(i) for i in (idx.tolist() if torch.is_tensor(idx) else idx)]
    if len(idx) != batch_size or n <= 0:
        return None

    def ok(m):
        return m >= 0 and micro_batch_indices(n, m, batch_size, rank, world, seed).tolist() == idx

    if hint is not None and ok(hint):
        return hint
    span = batch_size * world
    max_epoch = (max_micro_steps * span) // n + 2
    for epoch in range(max_epoch):
        hits = (_epoch_perm(n, seed, epoch) == idx[0]).nonzero()
        if not len(hits):
            return None
        start = epoch * n + int(hits[0]) - rank * batch_size
        if start >= 0 and start % span == 0 and ok(start // span):
            return start // span
    return None


def stream_seed(seed: int, position: int, stream: int) -> int:
    """A 63-bit seed for the random draw ``stream`` (augmentation, latent sample, caption dropout) at a row-stream
    position: a pure function, independent of process and device."""
    return (seed * 1_000_033 + position * 7_919 + stream * 104_729) % (2**63 - 1)


# -- latents ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def vae_posterior(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(B, 3, H, W)`` in [0, 1] → the VAE posterior ``(mean, std)``, each ``(B, C, h, w)`` (unscaled).

    Source: diffusers ``AutoencoderKL.encode(...).latent_dist`` (DiagonalGaussianDistribution).
    """
    x = images.to(model.device) * 2 - 1
    dist = model.vae.encode(x.float()).latent_dist
    return dist.mean, dist.std


def latents_from_posterior(model, mean: torch.Tensor, std: torch.Tensor,
                           generators: list[torch.Generator] | None) -> torch.Tensor:
    """Draw ``mean + std·ε`` per row (ε_j from the CPU generator ``generators[j]``, so any device gives the same
    draw; None = the posterior mean) and apply the VAE's shift / scaling factor → model latents ``(B, C, h, w)``.
    As the official loops (``latent_dist.sample() * scaling_factor``)."""
    if generators is None:
        latents = mean
    else:
        eps = torch.stack([torch.randn(mean.shape[1:], generator=g, dtype=torch.float32) for g in generators])
        latents = mean + std * eps.to(mean.device, mean.dtype)
    shift = getattr(model.vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * model.vae.config.scaling_factor


def latent_generators(seed: int, positions: list[int], rows: list[int], mode: str, member: int) -> list | None:
    """Per-row CPU generators for the posterior draw: ``mode`` "per_step" seeds by stream position (a fresh draw
    each time a row is used, exact on resume), "frozen" by row id (one draw per image for the whole run),
    "mean" → None (no draw). ``member`` 0 = winner, 1 = loser."""
    if mode == "mean":
        return None
    keys = positions if mode == "per_step" else [-1 - r for r in rows]
    return [torch.Generator().manual_seed(stream_seed(seed, q, _LATENT_STREAM + 1000 * member)) for q in keys]


def conditioning(model, prompts: list[str], original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor,
                 time_ids: str = "per_sample") -> dict[str, torch.Tensor]:
    """Text conditioning plus the pipeline's per-pair extras (SDXL ``time_ids``) for one batch, on the device.

    ``time_ids``: "per_sample" (the winner's original size and crop: MaPO, the diffusers port) or "fixed"
    (``[res, res, 0, 0, res, res]`` for every pair: SF-DPO ``train.py`` L1070–1085).
    """
    with torch.no_grad():
        cond = model.encode_prompt(list(prompts))
        if time_ids == "fixed":
            b, res = len(prompts), model.resolution
            original_sizes, crop_top_lefts = torch.full((b, 2), res), torch.zeros(b, 2, dtype=torch.long)
        cond.update(model.pair_extra_cond({"original_sizes": original_sizes, "crop_top_lefts": crop_top_lefts}))
    return cond


def dropout_mask(seed: int, positions: list[int], p: float) -> list[bool]:
    """Which rows get the empty prompt (caption dropout with probability ``p``), seeded per stream position."""
    if p <= 0:
        return [False] * len(positions)
    return [bool(np.random.default_rng(stream_seed(seed, q, _DROPOUT_STREAM)).random() < p) for q in positions]


# -- streamed pairs ----------------------------------------------------------------------------------------------
class _MicroBatches(torch.utils.data.Dataset):
    """Dataset whose item m is this rank's whole decoded micro-batch m (runs in DataLoader workers)."""

    def __init__(self, source: PreferenceSource, resolution: int, batch_size: int, rank: int, world: int,
                 seed: int, hflip: bool, pair_augment: str, random_crop: bool, proportion_empty_prompts: float):
        self.source, self.resolution, self.batch_size, self.rank, self.world = source, resolution, batch_size, rank, world
        self.seed, self.hflip, self.pair_augment, self.random_crop = seed, hflip, pair_augment, random_crop
        self.p_empty = proportion_empty_prompts

    def __len__(self) -> int:  # the stream is endless; DataLoader only needs a number
        return 2**62

    def __getitem__(self, micro_step: int) -> dict[str, Any]:
        idx = micro_batch_indices(self.source.n, micro_step, self.batch_size, self.rank, self.world, self.seed)
        start = row_offset(micro_step, self.batch_size, self.rank, self.world)
        return decode_rows(self.source, idx.tolist(), list(range(start, start + len(idx))), self.resolution,
                           self.seed, self.hflip, self.pair_augment, self.random_crop, self.p_empty)


def decode_rows(source: PreferenceSource, rows: list[int], positions: list[int], resolution: int, seed: int,
                hflip: bool = False, pair_augment: str = "joint", random_crop: bool = False,
                proportion_empty_prompts: float = 0.0) -> dict[str, Any]:
    """Decode and augment ``rows`` of ``source`` → uint8 ``chosen`` / ``rejected`` ``(B, 3, r, r)``, prompts (""
    where caption dropout hit), ``original_sizes`` / ``crop_top_lefts`` ``(B, 2)``, ``ids`` and ``unreadable``.

    Row ``rows[j]`` is augmented with an rng seeded by ``(seed, positions[j])``. An unreadable pair is replaced
    by the next readable row (``(row + k) mod n``, deterministic) and counted in ``unreadable``.

    Raises:
        ValueError: no readable row found after 100 tries (the source is mostly corrupt).
    """
    out = {"chosen": [], "rejected": [], "prompts": [], "original_sizes": [], "crop_top_lefts": [], "ids": [],
           "unreadable": 0}
    drop = dropout_mask(seed, positions, proportion_empty_prompts)
    for j, (row, pos) in enumerate(zip(rows, positions)):
        for k in range(100):
            r = (row + k) % source.n
            try:
                prompt, pw, pl = source.load_pair(r)
                break
            except Exception:  # any decoder error: count it, use the next row
                out["unreadable"] += 1
        else:
            raise ValueError(f"data.source {source.source!r}: 100 unreadable rows in a row from row {row}")
        rng = np.random.default_rng(stream_seed(seed, pos, _AUG_STREAM))
        xw, xl, size, crop = prepare_pair(pw, pl, resolution, rng, hflip, pair_augment, random_crop)
        # uint8 across the worker pipe: 4× less to copy than float
        out["chosen"].append((xw * 255).round().to(torch.uint8))
        out["rejected"].append((xl * 255).round().to(torch.uint8))
        out["prompts"].append("" if drop[j] else prompt)
        out["original_sizes"].append(size)
        out["crop_top_lefts"].append(crop)
        out["ids"].append(r)
    for k in ("chosen", "rejected"):
        out[k] = torch.stack(out[k])
    out["original_sizes"], out["crop_top_lefts"] = torch.tensor(out["original_sizes"]), torch.tensor(out["crop_top_lefts"])
    return out


class StreamedPairs:
    """Preference pairs read lazily from a :class:`PreferenceSource`, decoded per micro-batch in worker processes.

    The trainer's contract: ``n`` rows, ``batch(idx) -> dict`` with ``latents_w`` / ``latents_l`` ``(B, C, h, w)``
    (scaled model latents), ``cond`` (text conditioning + SDXL ``time_ids``) and ``ids``; ``skipped`` counts.
    ``batch(idx)`` recognises which micro-step ``idx`` belongs to (:func:`stream_position`) and serves it from
    a DataLoader that prefetches the following micro-steps in ``num_workers`` processes (``prefetch`` batches
    each); an ``idx`` that is not from the stream is decoded in place (augmentation seeded by row id).

    Args:
        model: the pipeline adapter (``vae``, ``encode_prompt``, ``pair_extra_cond``, ``resolution``, ``device``).
        source: the lazy pair table. batch_size / rank / world / seed: the trainer's stream parameters.
        hflip, pair_augment, random_crop: augmentation (see :func:`genalign.data.preference.prepare_pair`).
        proportion_empty_prompts: caption dropout probability (SF-DPO 0.2, MaPO 0).
        time_ids: "per_sample" | "fixed" (see :func:`conditioning`).
        latent_sample: "per_step" (a fresh posterior draw each time a row is used: the official loops), "frozen"
            (one draw per image) or "mean" (see :func:`latent_generators`).
        max_micro_steps: bound for :func:`locate_micro_step`'s search (steps × accumulation).
    """

    def __init__(self, model, source: PreferenceSource, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                 hflip: bool = False, pair_augment: str = "joint", random_crop: bool = False,
                 proportion_empty_prompts: float = 0.0, time_ids: str = "per_sample", latent_sample: str = "per_step",
                 num_workers: int = 0, prefetch: int = 2, max_micro_steps: int = 10**7):
        self.model, self.source, self.n = model, source, source.n
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.time_ids, self.latent_sample = time_ids, latent_sample
        self.num_workers, self.prefetch, self.max_micro_steps = num_workers, prefetch, max_micro_steps
        self._ds = _MicroBatches(source, model.resolution, batch_size, rank, world, seed, hflip, pair_augment,
                                 random_crop, proportion_empty_prompts)
        self._it, self._it_next, self._next_m = None, None, None
        self._last: tuple[int, dict] | None = None
        self._unreadable = 0

    @property
    def skipped(self) -> dict[str, int]:
        """Rows skipped so far (ties and bad rows at indexing; unreadable images as batches are decoded)."""
        out = dict(self.source.skipped)
        out["unreadable_images"] = out.get("unreadable_images", 0) + self._unreadable
        return out

    def _loader_at(self, m: int):
        loader = torch.utils.data.DataLoader(
            self._ds, batch_size=None, sampler=itertools.count(m), num_workers=self.num_workers,
            prefetch_factor=self.prefetch if self.num_workers else None)
        return iter(loader)

    def decoded(self, idx: torch.Tensor) -> tuple[int | None, dict[str, Any]]:
        """(micro-step or None, the decoded uint8 micro-batch) for ``idx``."""
        m = stream_position(idx, self.n, self.batch_size, self.rank, self.world, self.seed, self._next_m,
                            self.max_micro_steps)
        if m is None:
            rows = [int(i) for i in idx.tolist()]
            return None, decode_rows(self.source, rows, [-1 - r for r in rows], self.model.resolution, self.seed,
                                     self._ds.hflip, self._ds.pair_augment, self._ds.random_crop, self._ds.p_empty)
        if self._last is not None and self._last[0] == m:  # a second phase asking for the same rows
            return m, self._last[1]
        if self._it is None or self._it_next != m:
            self._it = self._loader_at(m)  # first call, resume, or a jump: restart the prefetch at m
        out = next(self._it)
        self._it_next = self._next_m = m + 1
        self._unreadable += out["unreadable"]
        self._last = (m, out)
        return m, out

    def batch(self, idx: torch.Tensor) -> dict[str, Any]:
        """Model-ready batch for pair indices ``idx`` (see class docstring)."""
        m, d = self.decoded(idx)
        start = row_offset(m, self.batch_size, self.rank, self.world) if m is not None else None
        positions = [start + j for j in range(len(d["ids"]))] if m is not None else [-1 - r for r in d["ids"]]
        lat = {}
        for j, key in enumerate(("chosen", "rejected")):
            mean, std = vae_posterior(self.model, d[key].float() / 255.0)
            gens = latent_generators(self.seed, positions, d["ids"], self.latent_sample, j)
            lat[key] = latents_from_posterior(self.model, mean, std, gens)
        cond = conditioning(self.model, d["prompts"], d["original_sizes"], d["crop_top_lefts"], self.time_ids)
        return {"latents_w": lat["chosen"], "latents_l": lat["rejected"], "cond": cond, "ids": list(d["ids"])}
