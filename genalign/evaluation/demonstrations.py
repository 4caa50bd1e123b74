"""DRAGON's demonstration builders: split one round's scored generations into D+ and D− ([recon], dragon.md §2.4).

DRAGON's method section could not be read and it has no official code, so every builder here is a
reconstruction, exposed as an option of the ``dragon`` objective:

- instance reward, paired: per prompt the best generation is chosen, the worst rejected; prompts whose best equals
  their worst are dropped and counted (:func:`build_paired_best_worst`);
- instance reward (or per-item credit), unpaired: D+ = the upper half (:func:`build_unpaired_threshold`);
- set reward, paired: a greedy pairwise split that never lowers r(D+) (:func:`greedy_pairwise_split`);
- set reward, unpaired: leave-one-out credit c_i = r(D) − r(D ∖ {i}), then the upper half
  (:func:`leave_one_out_contributions`, :func:`build_unpaired_leave_one_out`).

Rewards only select demonstrations; they are never differentiated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Tuple, Union

import torch

from genalign.rewards.terms import combined_values, leave_one_out_contributions

__all__ = [
    "PairedDemonstrations",
    "build_paired_best_worst",
    "build_unpaired_threshold",
    "greedy_pairwise_split",
    "leave_one_out_contributions",
    "build_unpaired_leave_one_out",
    "split_round",
]


@dataclass
class PairedDemonstrations:
    """Output of the paired builders. Indices are flat indices into the (P·K) generations (p·K + k).

    Attributes:
        prompt_index: (N,) long, prompt of each kept pair.
        chosen_index: (N,) long, flat index of the winner ("w").
        rejected_index: (N,) long, flat index of the loser ("l").
        num_dropped: number of prompts dropped because best == worst (ties), to be logged.
    """

    prompt_index: torch.Tensor
    chosen_index: torch.Tensor
    rejected_index: torch.Tensor
    num_dropped: int


def build_paired_best_worst(rewards: torch.Tensor, tie_tol: float = 0.0) -> PairedDemonstrations:
    """Instance reward, paired demonstrations: per prompt best → chosen, worst → rejected ([recon], dragon.md §2.4).

    Args:
        rewards: (P, K) instance rewards (higher is better) of K ≥ 2 generations for each of P prompts.
        tie_tol: prompts with max − min ≤ tie_tol are dropped and counted (default 0: only exact ties).

    Returns:
        :class:`PairedDemonstrations` with flat indices p·K + argmax / argmin.

    Raises:
        ValueError: rewards not 2-D, K < 2, non-finite rewards or tie_tol < 0.
    """
    if rewards.ndim != 2 or rewards.shape[1] < 2 or rewards.shape[0] == 0:
        raise ValueError(f"rewards must have shape (P, K) with P >= 1, K >= 2, got {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards must be finite")
    if tie_tol < 0:
        raise ValueError("tie_tol must be >= 0")
    r = rewards.detach().to(torch.float64)
    K = r.shape[1]
    best = r.argmax(dim=1)
    worst = r.argmin(dim=1)
    keep = (r.max(dim=1).values - r.min(dim=1).values) > tie_tol
    prompts = torch.nonzero(keep, as_tuple=False).flatten()
    return PairedDemonstrations(
        prompt_index=prompts,
        chosen_index=prompts * K + best[prompts],
        rejected_index=prompts * K + worst[prompts],
        num_dropped=int((~keep).sum()),
    )


def build_unpaired_threshold(
    rewards: torch.Tensor, threshold: Union[str, float] = "median"
) -> torch.Tensor:
    """Instance reward, unpaired demonstrations: D+ = {reward > threshold} ([recon], dragon.md §2.4).

    Values equal to the threshold go to D−. When that leaves D+ empty under "median" or "mean" — half or more of the values tie at the
    maximum, e.g. [0.5, 1, 1, 1] with the median — the tied maximum group is split deterministically: its
    ⌊N/2⌋ lowest indices (at least one) go to D+, the rest to D− (issue 14 item 9; before, every sample became
    undesirable).

    Args:
        rewards: (N,) instance rewards (or per-item credits) of the round's generations.
        threshold: "median" (reconstruction/recommendation default: batch median, lower median for even N),
            "mean", or a float.

    Returns:
        (N,) bool labels, True = desirable (D+).

    Raises:
        ValueError: rewards not 1-D / empty / non-finite, or an unknown threshold string.
    """
    if rewards.ndim != 1 or rewards.shape[0] == 0:
        raise ValueError(f"rewards must be a non-empty 1-D tensor, got {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards must be finite")
    r = rewards.detach().to(torch.float64)
    if threshold == "median":
        thr = r.median()
    elif threshold == "mean":
        thr = r.mean()
    elif isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        thr = torch.tensor(float(threshold), dtype=torch.float64)
    else:
        raise ValueError(f"threshold must be 'median', 'mean' or a number, got {threshold!r}")
    labels = r > thr
    if not labels.any() and isinstance(threshold, str):  # an explicit number is taken literally
        top = torch.nonzero(r == r.max(), as_tuple=False).flatten()  # ascending indices
        labels[top[: max(1, r.shape[0] // 2)]] = True
    return labels


def greedy_pairwise_split(
    items_a: torch.Tensor,
    items_b: torch.Tensor,
    set_reward_fn: Callable[[torch.Tensor], Union[torch.Tensor, float]],
) -> Tuple[torch.Tensor, list]:
    """Set reward, paired demonstrations: greedy pairwise split ([recon], dragon.md §2.4).

    Start with D+ = {a_i}; visit prompts in order and swap a_i ↔ b_i when that strictly raises r(D+).

    Args:
        items_a, items_b: (P, ...) the two generations' set-reward inputs per prompt (e.g. embeddings; for
            per-clip statistics a (P, T, E) tensor). Same shape.
        set_reward_fn: maps a stacked (N, ...) selection to a scalar set reward (higher is better, e.g. −FAD).

    Returns:
        ``(a_is_positive, trace)``: (P,) bool, True where a_i is the chosen member of pair i (b_i the rejected),
        and the list of r(D+) after each visit (non-decreasing, starting with r({a_i})).

    Raises:
        ValueError: shapes differ, P == 0, or the set reward is not finite.
    """
    if items_a.shape != items_b.shape or items_a.ndim < 1 or items_a.shape[0] == 0:
        raise ValueError(f"items_a and items_b must share a non-empty (P, ...) shape, got "
                         f"{tuple(items_a.shape)} and {tuple(items_b.shape)}")
    P = items_a.shape[0]
    a_pos = torch.ones(P, dtype=torch.bool)

    def reward_of(mask: torch.Tensor) -> float:
        sel = torch.where(mask.view((P,) + (1,) * (items_a.ndim - 1)).to(items_a.device), items_a, items_b)
        val = float(set_reward_fn(sel))
        if not math.isfinite(val):
            raise ValueError("set_reward_fn returned a non-finite value")
        return val

    current = reward_of(a_pos)
    trace = [current]
    for i in range(P):
        cand = a_pos.clone()
        cand[i] = False
        val = reward_of(cand)
        if val > current:
            a_pos, current = cand, val
        trace.append(current)
    return a_pos, trace


def build_unpaired_leave_one_out(
    items: torch.Tensor,
    set_reward_fn: Callable[[torch.Tensor], Union[torch.Tensor, float]],
    threshold: Union[str, float] = "median",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Set reward, unpaired demonstrations: D+ = {c_i > median(c)} with leave-one-out credit ([recon]).

    Returns ``(labels, contributions)``: (N,) bool (True = D+) and the (N,) credits. ``threshold`` as in
    :func:`build_unpaired_threshold` (reconstruction/recommendation default "median").
    """
    c = leave_one_out_contributions(items, set_reward_fn)
    return build_unpaired_threshold(c, threshold), c


def split_round(terms: list, latents: torch.Tensor, prompts: list[str], evals: list[dict], num_prompts: int, k: int,
                paired: bool, set_pair_builder: str = "greedy", tie_tol: float = 0.0,
                unpaired_threshold: Union[str, float] = "median") -> dict:
    """D+/D− of one DRAGON round from its P·K generations (flat index p·K + j) and the terms' evaluations.

    Args:
        terms: reward terms (``kind``, ``set_fn``, ``per_item``, ``weight``, ``normalize``;
            :mod:`genalign.rewards.terms`). latents: ``(P·K, ...)`` generation latents; prompts: P·K prompts.
        evals: each term's evaluation of the generations (``RewardTerm.evaluate``).
        num_prompts, k: P and K.
        paired: Diffusion-DPO demonstrations (chosen, rejected); else Diffusion-KTO labels.
        set_pair_builder: paired with a single set term: "greedy" (:func:`greedy_pairwise_split`, K = 2) or
            "best_worst" on leave-one-out credit. tie_tol: :func:`build_paired_best_worst`.
        unpaired_threshold: :func:`build_unpaired_threshold` on the combined per-item values.

    Returns:
        paired: ``{"paired": True, "latents_w", "latents_l", "prompts", "n", "dropped"}``; unpaired:
        ``{"paired": False, "latents", "labels" (float 0/1), "prompts", "n", "dropped": 0}``.

    Raises:
        ValueError: the greedy set-pair builder with K ≠ 2.
    """
    if not paired:
        labels = build_unpaired_threshold(combined_values(terms, evals), unpaired_threshold)
        return {"paired": False, "latents": latents, "labels": labels.float(), "prompts": list(prompts),
                "n": int(latents.shape[0]), "dropped": 0}
    if len(terms) == 1 and terms[0].kind == "set" and set_pair_builder == "greedy":
        if k != 2:
            raise ValueError("set_pair_builder=greedy needs clips_per_prompt = 2")
        items = evals[0]["items"].reshape(num_prompts, 2, *evals[0]["items"].shape[1:])
        a_pos, _ = greedy_pairwise_split(items[:, 0], items[:, 1], terms[0].set_fn)
        pidx = torch.arange(num_prompts)
        ch, rj, dropped = pidx * 2 + torch.where(a_pos, 0, 1), pidx * 2 + torch.where(a_pos, 1, 0), 0
    else:
        demo = build_paired_best_worst(combined_values(terms, evals).view(num_prompts, k), tie_tol)
        ch, rj, dropped = demo.chosen_index, demo.rejected_index, demo.num_dropped
    return {"paired": True, "latents_w": latents[ch], "latents_l": latents[rj],
            "prompts": [prompts[i] for i in ch.tolist()], "n": int(len(ch)), "dropped": int(dropped)}
