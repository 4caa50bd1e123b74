"""Training data as model inputs: cached pair latents, streamed pairs, prompt batches, and the seeded batch order.

Every data object has ``n`` (rows) and ``batch(idx) -> dict`` (model-ready tensors on the model's device), and the
rows of micro-step m are a pure function of (seed, m, rank) (:func:`micro_batch_indices`), so a resumed run sees
exactly the batches an uninterrupted run would have. Offline preference data is streamed
(:class:`~genalign.data.streaming.StreamedPairs`) unless ``data.cache_latents`` asks to encode a small set once.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from genalign.data.preference import PreferencePairs, PreferenceSource, load_preference_pairs
from genalign.data.streaming import (StreamedPairs, conditioning, dropout_mask, latent_generators,
                                     latents_from_posterior, micro_batch_indices, row_offset, stream_position,
                                     vae_posterior)

__all__ = ["CachedPairs", "PromptData", "StreamedPairs", "build_default_data", "load_training_pairs",
           "micro_batch_indices", "row_offset"]


class CachedPairs:
    """In-memory pairs (small sets: on-policy pairs, digits) as model inputs for N rows.

    With ``cache`` the VAE and text encoders run once here: the VAE posterior mean and std are kept and the
    latent sample is drawn per use from a generator seeded by the row's stream position (``latent_sample:
    per_step``, as the official loops re-sample every step; exact on resume), or drawn once at cache time
    (``frozen``, the old behaviour) or not at all (``mean``). Without ``cache``, images and prompts are kept and
    encoded per batch. Caption dropout (``proportion_empty_prompts``) swaps in the cached empty-prompt embedding
    per use; ``time_ids: fixed`` gives every pair ``[res, res, 0, 0, res, res]``.

    Args:
        model: pipeline adapter. pairs: :class:`PreferencePairs` (images ``(N, 3, H, W)`` in [0, 1]).
        batch_size / rank / world / encode_seed: the trainer's stream parameters (``encode_seed`` = run seed).
        max_micro_steps: bound for locating a batch's micro-step (steps × accumulation).
    """

    def __init__(self, model, pairs, cache: bool = True, batch_size: int = 32, encode_seed: int = 0, *,
                 stream_batch_size: int | None = None, rank: int = 0, world: int = 1, latent_sample: str = "per_step",
                 proportion_empty_prompts: float = 0.0, time_ids: str = "per_sample", max_micro_steps: int = 10**7):
        self.model, self.pairs, self.cache = model, pairs, cache
        self.n = len(pairs)
        self.encode_seed, self.latent_sample, self.time_ids = encode_seed, latent_sample, time_ids
        self.p_empty = proportion_empty_prompts
        self.stream = (stream_batch_size, rank, world)
        self.max_micro_steps = max_micro_steps
        self._next_m = None
        self.empty_cond = None
        if proportion_empty_prompts > 0:
            self.empty_cond = {k: v.cpu() for k, v in conditioning(model, [""], torch.zeros(1, 2, dtype=torch.long),
                                                                    torch.zeros(1, 2, dtype=torch.long), "fixed").items()
                               if k not in ("time_ids",)}
        if cache:
            g = torch.Generator(device="cpu").manual_seed(encode_seed)
            means, stds, conds = {0: [], 1: []}, {0: [], 1: []}, []
            for i in range(0, self.n, batch_size):
                sl = slice(i, i + batch_size)
                for j, imgs in enumerate((pairs.chosen[sl], pairs.rejected[sl])):
                    mean, std = vae_posterior(model, imgs)
                    if latent_sample == "frozen":  # one draw per image at cache time (same order as before)
                        eps = torch.randn(mean.shape, generator=g).to(mean.device)
                        mean, std = mean + std * eps, torch.zeros_like(std)
                    means[j].append(mean.cpu())
                    stds[j].append(std.cpu())
                conds.append(self._cond(list(range(i, min(i + batch_size, self.n)))))
            self.mean_w, self.mean_l = torch.cat(means[0]), torch.cat(means[1])
            self.std_w, self.std_l = torch.cat(stds[0]), torch.cat(stds[1])
            self.cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}

    def _cond(self, idx: list[int]) -> dict[str, torch.Tensor]:
        cond = conditioning(self.model, [self.pairs.prompts[i] for i in idx], self.pairs.original_sizes[idx],
                            self.pairs.crop_top_lefts[idx], self.time_ids)
        return {k: v.cpu() for k, v in cond.items()}

    @property
    def skipped(self) -> dict[str, int]:
        """Rows skipped while loading (ties, unreadable images, small reward gaps), by reason."""
        return self.pairs.skipped

    def positions(self, idx: torch.Tensor) -> list[int]:
        """Stream positions of ``idx``'s rows (negative row-id keys when ``idx`` is not a micro-batch of the run)."""
        b, rank, world = self.stream
        m = None
        if b is not None:
            m = stream_position(idx, self.n, b, rank, world, self.encode_seed, self._next_m, self.max_micro_steps)
        if m is None:
            return [-1 - int(r) for r in idx.tolist()]
        self._next_m = m + 1
        start = row_offset(m, b, rank, world)
        return list(range(start, start + len(idx)))

    def batch(self, idx: torch.Tensor) -> dict[str, Any]:
        """Model-ready batch for pair indices ``idx`` (on the model's device)."""
        dev, rows = self.model.device, idx.tolist()
        pos = self.positions(idx)
        mode = "mean" if self.latent_sample == "frozen" and self.cache else self.latent_sample
        if self.cache:
            lw = latents_from_posterior(self.model, self.mean_w[idx].to(dev), self.std_w[idx].to(dev),
                                        latent_generators(self.encode_seed, pos, rows, mode, 0))
            ll = latents_from_posterior(self.model, self.mean_l[idx].to(dev), self.std_l[idx].to(dev),
                                        latent_generators(self.encode_seed, pos, rows, mode, 1))
            cond = {k: v[idx].to(dev) for k, v in self.cond.items()}
        else:
            lat = []
            for j, imgs in enumerate((self.pairs.chosen[idx], self.pairs.rejected[idx])):
                mean, std = vae_posterior(self.model, imgs)
                lat.append(latents_from_posterior(self.model, mean, std,
                                                  latent_generators(self.encode_seed, pos, rows, mode, j)))
            lw, ll = lat
            cond = {k: v.to(dev) for k, v in self._cond(rows).items()}
        drop = dropout_mask(self.encode_seed, pos, self.p_empty)
        if any(drop):
            mask = torch.tensor(drop, device=dev)
            for k, v in self.empty_cond.items():
                e = v.to(dev).expand_as(cond[k])
                cond[k] = torch.where(mask.view(-1, *[1] * (cond[k].dim() - 1)), e, cond[k])
        return {"latents_w": lw, "latents_l": ll, "cond": cond, "ids": rows}


def load_training_pairs(cfg, model, rewards, run_dir: Path, acc, ctx=None) -> PreferencePairs:
    """In-memory pairs: offline preference pairs decoded up front (``data.cache_latents``: small sets), or on-policy
    pairs generated once (rank 0, with progress through ``ctx``) and cached in ``RUN_DIR/data`` under a fingerprint
    of the model, the data source, the rewards and the seed (a cache from another run is never reused)."""
    src = cfg.data.source
    if src.kind == "preference":
        return load_preference_pairs(src.source, model.resolution, split=src.split, ties=src.ties,
                                     max_pairs=src.max_pairs, hflip=src.hflip, pair_augment=src.pair_augment,
                                     seed=cfg.seed, random_crop=src.random_crop)
    from genalign.data.onpolicy import generate_onpolicy_pairs
    from genalign.data.prompts import load_prompts

    key = hashlib.sha256(json.dumps([cfg.pipeline.model_dump(mode="json"), src.model_dump(mode="json"),
                                     [r.model_dump(mode="json") for r in cfg.rewards], cfg.seed],
                                    sort_keys=True).encode()).hexdigest()[:16]
    cache = run_dir / "data" / f"onpolicy_pairs-{key}.pt"
    if acc.is_main_process and not cache.exists():
        # Rank by the composite (weighted, normalised members) unless one reward is named.
        reward = rewards if src.reward is None else _single_reward(cfg, src.reward, acc.device)
        prompts = load_prompts(src.prompts)
        total = len(prompts) * src.rounds * src.samples_per_prompt
        progress = ctx.progress("generate pairs", total=total, unit="sample") if ctx is not None else nullcontext(None)
        # A fresh LoRA adds exactly zero: sample with the base weights alone (model.skip_zero_adapters).
        with progress as bar, model.skip_zero_adapters():
            pairs = generate_onpolicy_pairs(
                model, reward, prompts, src.samples_per_prompt, src.rounds, src.min_reward_gap,
                src.num_inference_steps, src.guidance_scale, seed=cfg.seed, batch_size=64,
                progress=(lambda n: bar.update(n * src.samples_per_prompt)) if bar is not None else None)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save(pairs.__dict__, tmp)
        tmp.replace(cache)
    acc.wait_for_everyone()
    return PreferencePairs(**torch.load(cache, weights_only=True))


def _single_reward(cfg, name: str, device):
    from genalign.rewards.composite import CompositeReward

    return CompositeReward.from_specs([{"name": name}], device=device).eval()


class PromptData:
    """Prompt-only data (DI*, R0, DRAGON online generation): ``batch(idx)`` → prompts and their cached conditioning."""

    def __init__(self, model, prompts: list[str]):
        self.model, self.prompts = model, list(prompts)
        self.n = len(self.prompts)
        conds = [model.encode_prompt(self.prompts[i:i + 64]) for i in range(0, self.n, 64)]
        self.cond = {k: torch.cat([c[k].cpu() for c in conds]) for k in conds[0]}

    def batch(self, idx: torch.Tensor) -> dict[str, Any]:
        dev = self.model.device
        return {"prompts": [self.prompts[i] for i in idx.tolist()], "cond": {k: v[idx].to(dev) for k, v in self.cond.items()},
                "ids": idx.tolist()}


def build_default_data(ctx, data_kind: str):
    """Data for the built-in kinds: "pairs" (offline preference pairs → :class:`StreamedPairs`, or with
    ``data.cache_latents`` / on-policy pairs → :class:`CachedPairs`) and
    "prompts" (:class:`PromptData` from ``data.source.prompts``).

    Raises:
        ValueError: a data kind this function does not build (the objective must override ``build_data``), or a
            data source that does not fit the kind.
    """
    cfg = ctx.cfg
    if data_kind == "pairs":
        if cfg.data.source.kind not in ("onpolicy", "preference"):
            raise ValueError(f"data.source.kind: {cfg.data.source.kind!r}: objective {cfg.objective.name!r} needs "
                             "preference pairs (kind: preference or onpolicy)")
        d, src, acc, t = cfg.data, cfg.data.source, ctx.accelerator, cfg.train
        stream = {"rank": acc.process_index, "world": acc.num_processes, "latent_sample": d.latent_sample,
                  "proportion_empty_prompts": d.proportion_empty_prompts, "time_ids": d.time_ids,
                  "max_micro_steps": t.steps * t.gradient_accumulation_steps + 1}
        if src.kind == "preference" and not d.cache_latents:
            source = PreferenceSource(src.source, split=src.split, ties=src.ties, max_pairs=src.max_pairs)
            return StreamedPairs(ctx.model, source, t.batch_size, seed=cfg.seed, hflip=src.hflip,
                                 pair_augment=src.pair_augment, random_crop=src.random_crop, num_workers=d.num_workers,
                                 prefetch=d.prefetch, **stream)
        pairs = load_training_pairs(cfg, ctx.model, ctx.rewards, ctx.run_dir, acc, ctx)
        return CachedPairs(ctx.model, pairs, cache=d.cache_latents, encode_seed=cfg.seed,
                           stream_batch_size=t.batch_size, **stream)
    if data_kind == "prompts":
        from genalign.data.prompts import load_prompts

        src = cfg.data.source
        if not hasattr(src, "prompts"):
            raise ValueError(f"data.source.kind: {src.kind!r}: objective {cfg.objective.name!r} needs prompts "
                             "(kind: prompts)")
        return PromptData(ctx.model, load_prompts(src.prompts))
    raise ValueError(f"objective {cfg.objective.name!r}: data kind {data_kind!r} has no default builder")
