"""Training data as model inputs: cached pair latents, prompt batches, and the seeded batch order.

Every data object has ``n`` (rows) and ``batch(idx) -> dict`` (model-ready tensors on the model's device), and the
rows of micro-step m are a pure function of (seed, m, rank) (:func:`micro_batch_indices`), so a resumed run sees
exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

class CachedPairs:
    """Pairs as model inputs: latents ``(N, C, h, w)`` for chosen / rejected and text conditioning for N rows.

    With ``cache_latents`` the VAE and text encoders run once here, so a training step runs the UNet only;
    without it, images and prompts are kept and encoded per batch.
    """

    def __init__(self, model, pairs, cache: bool = True, batch_size: int = 32, encode_seed: int = 0):
        self.model, self.pairs, self.cache = model, pairs, cache
        self.n = len(pairs)
        self.encode_seed = encode_seed
        if cache:
            g = torch.Generator(device="cpu").manual_seed(encode_seed)
            lw, ll, conds = [], [], []
            for i in range(0, self.n, batch_size):
                sl = slice(i, i + batch_size)
                lw.append(self._encode(pairs.chosen[sl], g).cpu())
                ll.append(self._encode(pairs.rejected[sl], g).cpu())
                conds.append(self._cond(list(range(i, min(i + batch_size, self.n)))))
            self.latents_w, self.latents_l = torch.cat(lw), torch.cat(ll)
            self.cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}

    def _encode(self, images, g):
        # The VAE posterior sample needs a CPU generator for determinism on any device.
        x = images.to(self.model.device) * 2 - 1
        dist = self.model.vae.encode(x.float()).latent_dist
        eps = torch.randn(dist.mean.shape, generator=g).to(dist.mean.device)
        latents = dist.mean + dist.std * eps
        shift = getattr(self.model.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.model.vae.config.scaling_factor

    @torch.no_grad()
    def _cond(self, idx: list[int]) -> dict[str, torch.Tensor]:
        cond = self.model.encode_prompt([self.pairs.prompts[i] for i in idx])
        extra = self.model.pair_extra_cond({"original_sizes": self.pairs.original_sizes[idx],
                                            "crop_top_lefts": self.pairs.crop_top_lefts[idx]})
        cond.update(extra)
        return {k: v.cpu() for k, v in cond.items()}

    @property
    def skipped(self) -> dict[str, int]:
        """Rows skipped while loading (ties, unreadable images, small reward gaps), by reason."""
        return self.pairs.skipped

    def batch(self, idx: torch.Tensor) -> dict[str, Any]:
        """Model-ready batch for pair indices ``idx`` (on the model's device)."""
        dev = self.model.device
        if self.cache:
            return {"latents_w": self.latents_w[idx].to(dev), "latents_l": self.latents_l[idx].to(dev),
                    "cond": {k: v[idx].to(dev) for k, v in self.cond.items()}, "ids": idx.tolist()}
        with torch.no_grad():
            g = torch.Generator().manual_seed(self.encode_seed + int(idx[0]))
            return {"latents_w": self._encode(self.pairs.chosen[idx], g), "latents_l": self._encode(self.pairs.rejected[idx], g),
                    "cond": {k: v.to(dev) for k, v in self._cond(idx.tolist()).items()}, "ids": idx.tolist()}


def row_offset(micro_step: int, batch_size: int, rank: int, world: int) -> int:
    """Position in the row stream where this rank's micro-batch starts (also seeds its noise, so N ranks with
    accumulation A and one rank with accumulation N·A see the same rows *and* the same noise)."""
    return micro_step * batch_size * world + rank * batch_size


def micro_batch_indices(n: int, micro_step: int, batch_size: int, rank: int, world: int, seed: int) -> torch.Tensor:
    """Indices of this rank's rows for a global micro-step: an endless stream of seeded epoch permutations, cut
    into global batches of ``batch_size × world`` rows; rank r takes the r-th slice. A pure function (exact resume)."""
    start = row_offset(micro_step, batch_size, rank, world)
    out = []
    while len(out) < batch_size:
        epoch, pos = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(batch_size - len(out), n - pos)
        out.extend(perm[pos:pos + take].tolist())
    return torch.tensor(out)



def load_training_pairs(cfg, model, rewards, run_dir: Path, acc):
    """Offline preference pairs, or on-policy pairs generated once (rank 0) and cached in ``RUN_DIR/data``."""
    src = cfg.data.source
    if src.kind == "preference":
        from genalign.data.preference import load_preference_pairs

        return load_preference_pairs(src.source, model.resolution, split=src.split, ties=src.ties,
                                     max_pairs=src.max_pairs, hflip=src.hflip, pair_augment=src.pair_augment,
                                     seed=cfg.seed)
    from genalign.data.onpolicy import generate_onpolicy_pairs
    from genalign.data.preference import PreferencePairs
    from genalign.data.prompts import load_prompts

    cache = run_dir / "data" / "onpolicy_pairs.pt"
    if acc.is_main_process and not cache.exists():
        # Rank by the composite (weighted, normalised members) unless one reward is named.
        reward = rewards if src.reward is None else _single_reward(cfg, src.reward, acc.device)
        pairs = generate_onpolicy_pairs(model, reward, load_prompts(src.prompts), src.samples_per_prompt, src.rounds,
                                        src.min_reward_gap, src.num_inference_steps, src.guidance_scale, seed=cfg.seed)
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
    """Data for the built-in kinds: "pairs" (offline or on-policy preference pairs → :class:`CachedPairs`) and
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
        pairs = load_training_pairs(cfg, ctx.model, ctx.rewards, ctx.run_dir, ctx.accelerator)
        return CachedPairs(ctx.model, pairs, cache=cfg.data.cache_latents, encode_seed=cfg.seed)
    if data_kind == "prompts":
        from genalign.data.prompts import load_prompts

        src = cfg.data.source
        if not hasattr(src, "prompts"):
            raise ValueError(f"data.source.kind: {src.kind!r}: objective {cfg.objective.name!r} needs prompts "
                             "(kind: prompts)")
        return PromptData(ctx.model, load_prompts(src.prompts))
    raise ValueError(f"objective {cfg.objective.name!r}: data kind {data_kind!r} has no default builder")
