"""Reward win rates of a fine-tuned model against its base, with binomial confidence intervals.

The **per-sample reward win rate** (DRAGON's headline metric, dragon.md §7, [recon] of the paper's definition):
for each evaluation prompt and seed, the aligned model's sample and the base model's sample (same prompt, same
seed) are scored by the target reward; the win rate is the fraction of such pairs the aligned sample wins, ties
counting ½. Its uncertainty is that of a binomial proportion over the n pairs: :func:`paired_win_rate` reports
the Wilson score interval (scipy) and the two-sided sign-test p-value (scipy ``binomtest``, ties dropped).

For **set-level rewards** (dataset FAD, Vendi) one sample has no score of its own. :func:`set_swap_win_rate`
keeps the per-sample protocol: pair i is won when putting the aligned sample in place of the base sample i
raises the base set's reward — again n paired binary outcomes with a binomial interval ([recon]).

:func:`subset_bootstrap_preference` is the older figure, named for what it is: the fraction of random half-size
subsets (shared prompts/seeds) on which the aligned set scores higher. Subsets of one sample set are strongly
dependent, so it is **not** a win rate and carries no significance: two models drawn from the same distribution
score anywhere in 0.18–0.74 on it (issue 14 item 10).

Source: Wilson (1927) score interval; scipy.stats ``binomtest`` / ``norm``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from scipy import stats

__all__ = ["win_rate", "wilson_interval", "paired_win_rate", "set_swap_win_rate", "subset_bootstrap_preference",
           "term_win_rates"]


def _check_pair(new: torch.Tensor, base: torch.Tensor) -> None:
    if new.shape != base.shape or new.ndim != 1 or new.shape[0] == 0:
        raise ValueError(f"need two non-empty (N,) tensors of equal shape, got {tuple(new.shape)} and "
                         f"{tuple(base.shape)}")
    if not (torch.isfinite(new).all() and torch.isfinite(base).all()):
        raise ValueError("rewards must be finite")


def win_rate(rewards_new: torch.Tensor, rewards_base: torch.Tensor, tie_value: float = 0.5,
             tie_tol: float = 0.0) -> float:
    """Fraction of pairs won by the fine-tuned model, ties counting ``tie_value`` ([recon], dragon.md §7).

    Args:
        rewards_new, rewards_base: ``(N,)`` target-reward values for the same N prompts and seeds.
        tie_value: credit for a tie, in [0, 1] (½ by default).
        tie_tol: |Δ| ≤ tie_tol is a tie (default 0: exact ties only).

    Returns:
        A fraction in [0, 1]; identical models give ``tie_value``.

    Raises:
        ValueError: shape mismatch, empty or non-finite inputs, ``tie_value`` outside [0, 1].
    """
    _check_pair(rewards_new, rewards_base)
    if not 0.0 <= tie_value <= 1.0:
        raise ValueError("tie_value must be in [0, 1]")
    d = rewards_new.detach().to(torch.float64) - rewards_base.detach().to(torch.float64)
    tie = d.abs() <= tie_tol
    won = (d > 0) & ~tie
    return float((won.to(torch.float64) + tie_value * tie.to(torch.float64)).mean())


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion successes/n.

    ``successes`` may be fractional (ties counted ½); for integers it equals scipy's
    ``binomtest(k, n).proportion_ci(confidence, method="wilson")`` (tested).

    Raises:
        ValueError: n < 1, successes outside [0, n], or confidence outside (0, 1).
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need n >= 1 and 0 <= successes <= n, got successes={successes}, n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_win_rate(rewards_new: torch.Tensor, rewards_base: torch.Tensor, confidence: float = 0.95,
                    tie_tol: float = 0.0) -> dict:
    """Per-sample reward win rate with its binomial uncertainty.

    Args:
        rewards_new, rewards_base: ``(N,)`` rewards of aligned and base samples, same prompt and seed per index.
        confidence: level of the Wilson interval.
        tie_tol: |Δ| ≤ tie_tol is a tie.

    Returns:
        ``{"win_rate", "ci_low", "ci_high", "confidence", "n", "wins", "ties", "losses", "p_value"}``: win rate with
        ties ½, the Wilson interval of that proportion, and the two-sided sign-test p-value of wins vs losses (ties
        dropped; 1.0 when every pair ties).

    Raises:
        ValueError: as :func:`win_rate`.
    """
    rate = win_rate(rewards_new, rewards_base, 0.5, tie_tol)
    d = rewards_new.detach().double() - rewards_base.detach().double()
    tie = d.abs() <= tie_tol
    wins, ties = int(((d > 0) & ~tie).sum()), int(tie.sum())
    n = int(d.numel())
    losses = n - wins - ties
    lo, hi = wilson_interval(wins + 0.5 * ties, n, confidence)
    p = float(stats.binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else 1.0
    return {"win_rate": rate, "ci_low": lo, "ci_high": hi, "confidence": confidence, "n": n, "wins": wins,
            "ties": ties, "losses": losses, "p_value": p}


def set_swap_win_rate(items_new: torch.Tensor, items_base: torch.Tensor,
                      set_reward_fn: Callable[[torch.Tensor], Union[torch.Tensor, float]],
                      confidence: float = 0.95) -> dict:
    """Per-sample win rate for a set-level reward: pair i is won when swapping the aligned sample i into the base
    set raises the set reward, r(B with b_i → n_i) > r(B) ([recon]).

    Args:
        items_new, items_base: ``(N, ...)`` set-reward inputs (embeddings), aligned by prompt and seed.
        set_reward_fn: stacked ``(N, ...)`` items → scalar (higher is better, e.g. −FAD).

    Returns:
        As :func:`paired_win_rate` (N + 1 reward evaluations).

    Raises:
        ValueError: shape mismatch, N < 2, or a non-finite set reward.
    """
    if items_new.shape != items_base.shape or items_new.ndim < 1 or items_new.shape[0] < 2:
        raise ValueError("items_new and items_base must share a (N, ...) shape with N >= 2")
    base_value = float(set_reward_fn(items_base))
    swapped = torch.empty(items_new.shape[0], dtype=torch.float64)
    for i in range(items_new.shape[0]):
        mixed = items_base.clone()
        mixed[i] = items_new[i]
        swapped[i] = float(set_reward_fn(mixed))
    if not (math.isfinite(base_value) and torch.isfinite(swapped).all()):
        raise ValueError("set_reward_fn returned a non-finite value")
    return paired_win_rate(swapped, torch.full_like(swapped, base_value), confidence)


def subset_bootstrap_preference(items_new: torch.Tensor, items_base: torch.Tensor,
                                set_reward_fn: Callable[[torch.Tensor], Union[torch.Tensor, float]],
                                num_subsets: int = 100, subset_size: Optional[int] = None,
                                generator: Optional[torch.Generator] = None, tie_value: float = 0.5) -> float:
    """Fraction of shared random subsets on which the aligned set's reward beats the base set's (not a win rate).

    Draws ``num_subsets`` index subsets (without replacement, size ``subset_size``, default N // 2) shared by both
    models and compares r(new[S]) with r(base[S]), ties ``tie_value``. The subsets overlap, so the figure has no
    binomial interpretation (see the module docstring).

    Raises:
        ValueError: shape mismatch, N < 2, a bad subset size or ``num_subsets`` < 1.
    """
    if items_new.shape != items_base.shape or items_new.ndim < 1 or items_new.shape[0] < 2:
        raise ValueError("items_new and items_base must share a (N, ...) shape with N >= 2")
    n = items_new.shape[0]
    m = n // 2 if subset_size is None else int(subset_size)
    if not 1 <= m <= n or num_subsets < 1:
        raise ValueError(f"need 1 <= subset_size <= N and num_subsets >= 1 (got {m}, {num_subsets})")
    new_r, base_r = [], []
    for _ in range(num_subsets):
        idx = torch.randperm(n, generator=generator)[:m].to(items_new.device)
        new_r.append(float(set_reward_fn(items_new[idx])))
        base_r.append(float(set_reward_fn(items_base[idx])))
    return win_rate(torch.tensor(new_r, dtype=torch.float64), torch.tensor(base_r, dtype=torch.float64), tie_value)


def term_win_rates(terms: list, new: dict, base: dict, num_subsets: int = 200, seed: int = 0,
                   confidence: float = 0.95) -> dict:
    """Per reward term: reward before/after and the per-sample win rate of ``new`` over ``base`` with its interval.

    Args:
        terms: reward terms (``label``, ``kind``, ``set_fn`` for set terms; :mod:`genalign.rewards.terms`).
        new, base: ``{label: evaluation}`` of the aligned and the base model on the same prompts and seeds
            (instance: ``{"values": (N,)}``; set: ``{"items": (N, ...), "value"}``).
        num_subsets, seed: the subset-bootstrap preference reported beside set-term win rates.

    Returns:
        ``{label: {"kind", "before", "after", "win_rate", "ci_low", "ci_high", "n", "wins", "ties", "losses",
        "p_value", "method", ...}}``; set terms add ``subset_bootstrap_preference`` and a note saying what it is.
    """
    out: dict = {}
    for t in terms:
        b, n = base[t.label], new[t.label]
        if b["kind"] == "instance":
            out[t.label] = {"kind": "instance", "before": float(b["values"].mean()), "after": float(n["values"].mean()),
                            **paired_win_rate(n["values"], b["values"], confidence),
                            "method": "per sample (aligned vs base, same prompt and seed), ties 1/2, Wilson CI"}
            continue
        pref = subset_bootstrap_preference(n["items"], b["items"], t.set_fn, num_subsets=num_subsets,
                                           generator=torch.Generator().manual_seed(seed))
        out[t.label] = {"kind": "set", "before": float(b["value"]), "after": float(n["value"]),
                        **set_swap_win_rate(n["items"], b["items"], t.set_fn, confidence),
                        "method": "per sample: the aligned sample swapped into the base set raises r(set); ties "
                                  "1/2, Wilson CI",
                        "subset_bootstrap_preference": pref,
                        "subset_bootstrap_note": f"fraction of {num_subsets} shared half-size subsets on which the "
                                                 "aligned set scores higher: not a win rate, no significance"}
    return out
