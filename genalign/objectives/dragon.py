"""DRAGON — Distributional Rewards Optimize Diffusion Generative Models (Bai et al., TMLR 2025, arXiv 2504.15217).

DRAGON is an on-policy loop: each round the current model generates, the generations are scored with a reward
of any granularity (instance r(x), instance-to-distribution such as per-song FAD, or distribution-level such as
dataset FAD / Vendi), split into a positive set D+ and a negative set D−, and the model is updated with a
contrastive diffusion loss that pulls towards D+ and away from D−. The two plug-in losses are Diffusion-DPO
(paired, ``genalign.objectives.dpo.diffusion_dpo_loss``) and Diffusion-KTO (unpaired)::

    g_i = R_i − L_i,  z_ref = sg[max(0, mean_i g_i)],  h_i = σ(s_i·β·(g_i − z_ref)),  L = mean_i λ_{y_i}(1 − h_i)

Verified: the Diffusion-KTO loss ([code] ``jacklishufan/diffusion-kto@226bbd0`` ``train_kto_sd_v1.5.py``,
``--halo sigmoid``: β = 1000, λ_D = λ_U = 1, z_ref clamped at 0, detached and all-reduced) and the Diffusion-DPO
loss ([code], see diffusion_dpo.md). DRAGON itself has no official code and its method section could not be
read, so the demonstration builders (best/worst pairing, median threshold, greedy pairwise split and
leave-one-out credit for set rewards), the choice of loss per reward kind, β for audio latents, round sizes and
the win-rate definition are reconstructions / recommendations ([recon] / [unknown → rec.]) and are exposed as
arguments. Rewards only select demonstrations; they are never differentiated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "DRAGONConfig",
    "diffusion_kto_loss",
    "dragon_dpo_loss",
    "PairedDemonstrations",
    "build_paired_best_worst",
    "build_unpaired_threshold",
    "greedy_pairwise_split",
    "leave_one_out_contributions",
    "build_unpaired_leave_one_out",
    "win_rate",
    "set_win_rate_bootstrap",
    "cosine_v_objective",
    "x0_from_v",
]


@dataclass
class DRAGONConfig:
    """Hyperparameters of DRAGON with provenance tags (see /work/shared/methods/dragon.md)."""

    loss_instance: str = "dpo"  # [unknown → rec.] DPO-paired for instance-level rewards
    loss_set: str = "kto"  # [unknown → rec.] KTO-unpaired for set-level rewards
    beta_dpo: float = 5000.0  # [unknown → rec.] upstream image value (mean reduction, ½ factor); sweep ×{0.5, 2}
    beta_kto: float = 1000.0  # [unknown → rec.] upstream Diffusion-KTO value (mean reduction); sweep ×{0.5, 2}
    reduction: str = "mean"  # [code] per-sample MSE mean over all latent elements (DPO and KTO upstream)
    lambda_desirable: float = 1.0  # [code] Diffusion-KTO λ_D
    lambda_undesirable: float = 1.0  # [code] Diffusion-KTO λ_U
    kto_halo: str = "sigmoid"  # [code] `--halo sigmoid --bce_offset none`
    unpaired_threshold: str = "median"  # [recon] instance reward, unpaired: D+ = {reward > batch median}
    set_paired_builder: str = "greedy"  # [recon] greedy pairwise split for set rewards
    set_unpaired_builder: str = "leave_one_out"  # [recon] LOO credit c_i = r(D) − r(D∖{i}), D+ = {c_i > median}
    prompts_per_round: int = 256  # [unknown → rec.] P
    clips_per_prompt: int = 4  # [unknown → rec.] K (instance rewards)
    clips_per_prompt_set_pairs: int = 2  # [unknown → rec.] K for set-reward pairs
    passes_per_round: int = 1  # [unknown → rec.] one pass over the round's demonstrations
    learning_rate: float = 1e-5  # [unknown → rec.] AdamW, LoRA
    win_rate_tie_value: float = 0.5  # [recon] ties count ½
    set_win_rate_method: str = "bootstrap"  # [unknown → rec.] paper's set-level win-rate method not retrievable


# --------------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------------


def diffusion_kto_loss(
    model_losses: torch.Tensor,
    ref_losses: torch.Tensor,
    labels: torch.Tensor,
    beta: float = 1000.0,
    lambda_desirable: float = 1.0,
    lambda_undesirable: float = 1.0,
    *,
    kl: Optional[Union[torch.Tensor, float]] = None,
    reduce_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> Tuple[torch.Tensor, dict]:
    """Diffusion-KTO loss (sigmoid value function), as plugged into DRAGON's unpaired branch.

    Args:
        model_losses: (B,) per-sample denoising MSE L_i of the trained model, mean over all latent elements
            (official convention), each sample with its own (t, ε). Carries the graph.
        ref_losses: (B,) reference MSE R_i at the same (x_t, t, ε); treated as constants (detached here).
        labels: (B,) 1/True = desirable (D+), 0/False = undesirable (D−). Any other value raises.
        beta: β > 0 (upstream 1000 for mean-reduced image latents; [unknown → rec.] for DRAGON's audio latents).
        lambda_desirable, lambda_undesirable: λ_D, λ_U ≥ 0 (upstream 1, [code]).
        kl: optional reference point z_ref used *verbatim* (detached; e.g. a globally all-reduced value).
        reduce_fn: optional callable applied to the local mean of g before clamping (e.g. an all-reduce mean
            across ranks, as upstream ``accelerator.reduce(kl, 'mean')``). Ignored when ``kl`` is given.

    Returns:
        ``(loss, metrics)``: loss = mean_i λ_{y_i}·(1 − σ(s_i·β·(g_i − z_ref))) with g = R − L, s = ±1, and
        metrics ``kl`` (z_ref), ``implicit_acc`` (fraction with s·β·(g − z_ref) > 0), ``implicit_reward`` (mean g),
        ``raw_model_loss``, ``raw_ref_loss``, ``n_desirable``, ``n_undesirable``.

    Raises:
        ValueError: shapes differ or are not 1-D, labels not in {0, 1}, β ≤ 0, negative λ.

    Source: Li et al., Diffusion-KTO (NeurIPS 2024); ``jacklishufan/diffusion-kto@226bbd0``
    ``train_kto_sd_v1.5.py`` loss block (g_term, kl.clamp(min=0).detach(), label_sgn, w_y·(1 − h)); dragon.md §2.2.
    """
    for name, x in (("model_losses", model_losses), ("ref_losses", ref_losses), ("labels", labels)):
        if not isinstance(x, torch.Tensor) or x.ndim != 1 or x.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty 1-D tensor, got {getattr(x, 'shape', type(x))}")
    if model_losses.shape != ref_losses.shape or labels.shape != model_losses.shape:
        raise ValueError(
            f"shape mismatch: model_losses {tuple(model_losses.shape)}, ref_losses {tuple(ref_losses.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if lambda_desirable < 0 or lambda_undesirable < 0:
        raise ValueError("lambda_desirable and lambda_undesirable must be >= 0")
    lab = labels.to(torch.float32)
    if not bool(((lab == 0) | (lab == 1)).all()):
        raise ValueError("labels must be 0 (undesirable) or 1 (desirable)")
    desirable = lab == 1

    L = model_losses.to(torch.float32)
    R = ref_losses.detach().to(torch.float32)
    g = R - L
    if kl is None:
        z = g.detach().mean()
        if reduce_fn is not None:
            z = reduce_fn(z)
        z_ref = z.clamp(min=0).detach()
    else:
        z_ref = torch.as_tensor(kl, dtype=torch.float32, device=g.device).detach()
    sign = 2.0 * lab - 1.0
    logits = sign * beta * (g - z_ref)
    h = torch.sigmoid(logits)
    w = torch.where(desirable, torch.full_like(g, float(lambda_desirable)), torch.full_like(g, float(lambda_undesirable)))
    loss = (w * (1.0 - h)).mean()
    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "kl": z_ref.detach(),
            "implicit_acc": (logits > 0).float().mean(),
            "implicit_reward": g.detach().mean(),
            "raw_model_loss": L.detach().mean(),
            "raw_ref_loss": R.mean(),
            "n_desirable": desirable.sum().to(torch.float32),
            "n_undesirable": (~desirable).sum().to(torch.float32),
        }
    return loss, metrics


def dragon_dpo_loss(
    model_losses_w: torch.Tensor,
    model_losses_l: torch.Tensor,
    ref_losses_w: torch.Tensor,
    ref_losses_l: torch.Tensor,
    beta: float = 5000.0,
    **kwargs,
) -> Tuple[torch.Tensor, dict]:
    """DRAGON's paired branch: Diffusion-DPO on (chosen, rejected) demonstrations.

    Thin wrapper over ``genalign.objectives.dpo.diffusion_dpo_loss`` (imported lazily) so that DRAGON's
    recommended β = 5000 ([unknown → rec.]; official image value, mean reduction with the ½ factor) is the
    default here. Shapes: four (B,) per-sample MSEs; extra keyword arguments (e.g. ``half_factor``) are
    forwarded unchanged. Source: dragon.md §2.1 / diffusion_dpo.md §2.1.
    """
    from genalign.objectives.dpo import diffusion_dpo_loss  # lazy: written in parallel

    return diffusion_dpo_loss(model_losses_w, model_losses_l, ref_losses_w, ref_losses_l, beta=beta, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Demonstration builders (D+ / D−)
# --------------------------------------------------------------------------------------------------------------


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

    Args:
        rewards: (N,) instance rewards of the round's generations.
        threshold: "median" (reconstruction/recommendation default: batch median, lower median for even N),
            "mean", or a float.

    Returns:
        (N,) bool labels, True = desirable (D+). Samples equal to the threshold go to D−.

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
    return r > thr


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


def leave_one_out_contributions(
    items: torch.Tensor, set_reward_fn: Callable[[torch.Tensor], Union[torch.Tensor, float]]
) -> torch.Tensor:
    """Leave-one-out credit c_i = r(D) − r(D ∖ {i}) for a set reward ([recon], dragon.md §2.4).

    Args:
        items: (N, ...) set-reward inputs of the N generations, N ≥ 2 (the set reward must accept N − 1 items).
        set_reward_fn: maps a stacked (M, ...) tensor to a scalar (higher is better).

    Returns:
        (N,) float64 tensor; an item that hurts the set (e.g. an outlier far from the reference statistics of a
        −FAD reward) gets a negative, lowest credit. N + 1 reward evaluations.

    Raises:
        ValueError: N < 2 or non-finite rewards.
    """
    if items.ndim < 1 or items.shape[0] < 2:
        raise ValueError(f"items must have shape (N, ...) with N >= 2, got {tuple(items.shape)}")
    N = items.shape[0]
    full = float(set_reward_fn(items))
    out = torch.empty(N, dtype=torch.float64)
    idx = torch.arange(N, device=items.device)
    for i in range(N):
        val = float(set_reward_fn(items[idx != i]))
        out[i] = full - val
    if not torch.isfinite(out).all() or not math.isfinite(full):
        raise ValueError("set_reward_fn returned a non-finite value")
    return out


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


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------


def win_rate(
    rewards_new: torch.Tensor, rewards_base: torch.Tensor, tie_value: float = 0.5, tie_tol: float = 0.0
) -> float:
    """Reward win rate of a fine-tuned model vs the baseline ([recon], dragon.md §7).

    Args:
        rewards_new, rewards_base: (N,) target-reward values for the same N evaluation prompts and seeds.
        tie_value: credit for |Δ| ≤ tie_tol (reconstruction/recommendation: ½).
        tie_tol: tolerance for a tie (default 0: exact ties only).

    Returns:
        Fraction in [0, 1]: mean of 1[new > base] + tie_value·1[tie]. Identical models give ``tie_value``.

    Raises:
        ValueError: shape mismatch, empty inputs, non-finite values, tie_value outside [0, 1].
    """
    if rewards_new.shape != rewards_base.shape or rewards_new.ndim != 1 or rewards_new.shape[0] == 0:
        raise ValueError(f"need two non-empty (N,) tensors of equal shape, got {tuple(rewards_new.shape)} "
                         f"and {tuple(rewards_base.shape)}")
    if not (torch.isfinite(rewards_new).all() and torch.isfinite(rewards_base).all()):
        raise ValueError("rewards must be finite")
    if not 0.0 <= tie_value <= 1.0:
        raise ValueError("tie_value must be in [0, 1]")
    d = rewards_new.detach().to(torch.float64) - rewards_base.detach().to(torch.float64)
    tie = d.abs() <= tie_tol
    won = (d > 0) & ~tie
    return float((won.to(torch.float64) + tie_value * tie.to(torch.float64)).mean())


def set_win_rate_bootstrap(
    items_new: torch.Tensor,
    items_base: torch.Tensor,
    set_reward_fn: Callable[[torch.Tensor], Union[torch.Tensor, float]],
    num_subsets: int = 100,
    subset_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    tie_value: float = 0.5,
) -> float:
    """Win rate for a set-level reward by paired bootstrap subsets ([unknown → rec.], dragon.md §6.6).

    The paper's set-level win-rate procedure is not retrievable; this is genalign's reconstruction/recommendation:
    draw ``num_subsets`` index subsets (without replacement, size ``subset_size``, default N // 2) shared by both
    models (same prompts/seeds), compare r(new[S]) with r(base[S]), count ties as ``tie_value``.

    Args:
        items_new, items_base: (N, ...) set-reward inputs, aligned by prompt/seed.

    Raises:
        ValueError: shape mismatch, N < 2, bad subset size or num_subsets < 1.
    """
    if items_new.shape != items_base.shape or items_new.ndim < 1 or items_new.shape[0] < 2:
        raise ValueError("items_new and items_base must share a (N, ...) shape with N >= 2")
    N = items_new.shape[0]
    m = N // 2 if subset_size is None else int(subset_size)
    if not 1 <= m <= N or num_subsets < 1:
        raise ValueError(f"need 1 <= subset_size <= N and num_subsets >= 1 (got {m}, {num_subsets})")
    new_r, base_r = [], []
    for _ in range(num_subsets):
        idx = torch.randperm(N, generator=generator)[:m].to(items_new.device)
        new_r.append(float(set_reward_fn(items_new[idx])))
        base_r.append(float(set_reward_fn(items_base[idx])))
    return win_rate(torch.tensor(new_r, dtype=torch.float64), torch.tensor(base_r, dtype=torch.float64), tie_value)


# --------------------------------------------------------------------------------------------------------------
# Stable Audio Open v-objective plumbing (dragon.md §5, [recon, checked against the scheduler])
# --------------------------------------------------------------------------------------------------------------


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).view((-1,) + (1,) * (like.ndim - 1))


def cosine_v_objective(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cosine-schedule v-objective used by Stable Audio Open: returns ``(x_t, v)`` in fp32.

    a = cos(πt/2), s = sin(πt/2), x_t = a·x0 + s·ε, v = a·ε − s·x0. ``x0``, ``noise``: (B, ...); ``t``: (B,) in
    [0, 1]. Raises ValueError on shape mismatch or t outside [0, 1].
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 and noise shapes differ: {tuple(x0.shape)} vs {tuple(noise.shape)}")
    if t.ndim != 1 or t.shape[0] != x0.shape[0]:
        raise ValueError(f"t must have shape ({x0.shape[0]},), got {tuple(t.shape)}")
    if ((t < 0) | (t > 1)).any():
        raise ValueError("t must lie in [0, 1]")
    a = torch.cos(0.5 * math.pi * _bcast(t, x0))
    s = torch.sin(0.5 * math.pi * _bcast(t, x0))
    x0f, nf = x0.to(torch.float32), noise.to(torch.float32)
    return a * x0f + s * nf, a * nf - s * x0f


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 = a·x_t − s·v̂ for the cosine v-objective (see :func:`cosine_v_objective`); (B, ...) fp32."""
    if x_t.shape != v.shape:
        raise ValueError(f"x_t and v shapes differ: {tuple(x_t.shape)} vs {tuple(v.shape)}")
    if t.ndim != 1 or t.shape[0] != x_t.shape[0]:
        raise ValueError(f"t must have shape ({x_t.shape[0]},), got {tuple(t.shape)}")
    a = torch.cos(0.5 * math.pi * _bcast(t, x_t))
    s = torch.sin(0.5 * math.pi * _bcast(t, x_t))
    return a * x_t.to(torch.float32) - s * v.to(torch.float32)
