"""On-policy preference pairs (MaPO's self-generated setting): k samples per prompt from the base model, scored
by a reward, best vs worst kept as chosen / rejected.

Deterministic for a given seed; the result can be cached in the run folder so a resumed run reuses it.
"""

from __future__ import annotations

import logging

import torch

from genalign.data.preference import PreferencePairs

logger = logging.getLogger(__name__)


def best_worst_pairs(scores: torch.Tensor, min_gap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick the best and worst of each group of k scores.

    Args:
        scores: ``(P, k)`` rewards of k samples for each of P prompts (higher is better).
        min_gap: drop prompts whose best − worst gap is ≤ this value (a gap of exactly 0 is a tie and always dropped).

    Returns:
        ``(keep, best_idx, worst_idx)``: boolean ``(P,)`` mask and ``(P,)`` indices into k.
    """
    best, worst = scores.argmax(dim=1), scores.argmin(dim=1)
    gap = scores.max(dim=1).values - scores.min(dim=1).values
    keep = (gap > min_gap) & (gap > 0)
    return keep, best, worst


@torch.no_grad()
def generate_onpolicy_pairs(model, reward, prompts: list[str], samples_per_prompt: int = 4, rounds: int = 1,
                            min_reward_gap: float = 0.0, num_inference_steps: int = 25, guidance_scale: float = 1.0,
                            seed: int = 0, batch_size: int = 32, progress=None) -> PreferencePairs:
    """Generate ``rounds × len(prompts)`` candidate groups and keep best-vs-worst pairs.

    Args:
        model: a pipeline adapter with ``sample(prompts, num_inference_steps, guidance_scale, generator)``.
        reward: a reward (``score(images, prompts) -> (N,)``).
        prompts: training prompts (never the held-out ones).

    Returns:
        :class:`PreferencePairs` with images in [0, 1]; ``skipped["small_gap"]`` counts dropped groups.

    Raises:
        ValueError: every group was dropped by ``min_reward_gap``.
    """
    g = torch.Generator().manual_seed(seed)
    k = samples_per_prompt
    all_prompts = [p for _ in range(rounds) for p in prompts]
    chosen, rejected, kept_prompts, dropped = [], [], [], 0
    for i in range(0, len(all_prompts), max(1, batch_size // k)):
        chunk = all_prompts[i:i + max(1, batch_size // k)]
        expanded = [p for p in chunk for _ in range(k)]
        images = model.sample(expanded, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              generator=g, batch_size=batch_size)
        scores = reward.score(images.to(model.device), expanded).cpu()
        scores = scores.view(len(chunk), k)
        keep, best, worst = best_worst_pairs(scores, min_reward_gap)
        images = images.view(len(chunk), k, *images.shape[1:])
        for j, p in enumerate(chunk):
            if not keep[j]:
                dropped += 1
                continue
            chosen.append(images[j, best[j]])
            rejected.append(images[j, worst[j]])
            kept_prompts.append(p)
        if progress is not None:
            progress(len(chunk))
    if dropped:
        logger.info("on-policy pairs: dropped %d of %d groups with reward gap <= %g", dropped, len(all_prompts), min_reward_gap)
    if not kept_prompts:
        raise ValueError(f"data.source.min_reward_gap={min_reward_gap}: every on-policy group was dropped")
    n = len(kept_prompts)
    res = chosen[0].shape[-1]
    return PreferencePairs(kept_prompts, torch.stack(chosen), torch.stack(rejected),
                           torch.full((n, 2), res), torch.zeros(n, 2, dtype=torch.long), {"small_gap": dropped})
