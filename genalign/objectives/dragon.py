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


# ==============================================================================================================
# Trainer integration: the `dragon` objective (online rounds, instance / instance-to-set / set rewards)
# ==============================================================================================================

import json  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Literal  # noqa: E402

from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

from genalign.objectives.base import LossOutput, Objective, ObjectiveParams, TrainContext  # noqa: E402
from genalign.objectives.ddo import (  # noqa: E402
    _cond_rows, _floats, encode_prompts, sample_latents, shared_noise_losses,
)
from genalign.registry import objectives as _OBJECTIVES  # noqa: E402

logger = logging.getLogger(__name__)


def paired_shared_losses(model, latents_w: torch.Tensor, latents_l: torch.Tensor, cond: dict,
                         generator: Optional[torch.Generator] = None, reduction: str = "mean"):
    """Policy and reference per-sample losses of B pairs, any latent rank (images ``(B, C, h, w)``, audio
    ``(B, C, T)``): one (t, ε) per pair repeated for winner and loser, one policy forward over ``[w; l]`` (2B rows),
    reference at exactly the same inputs under ``no_grad`` (methods README §1-§2).

    Returns:
        ``(L_w, L_l, R_w, R_l)``, four (B,) fp32 tensors; only L carries a graph.

    Raises:
        ValueError: winner / loser shapes differ.
    """
    from genalign.objectives.ddo import per_sample_error
    from genalign.pipelines.base import repeat_cond

    if latents_w.shape != latents_l.shape:
        raise ValueError(f"winner/loser latents differ in shape: {tuple(latents_w.shape)} vs {tuple(latents_l.shape)}")
    b = latents_w.shape[0]
    noise = torch.randn(latents_w.shape, generator=generator, device="cpu").to(latents_w.device, latents_w.dtype)
    t = torch.randint(0, model.num_train_timesteps, (b,), generator=generator, device="cpu").to(latents_w.device)
    reps = (2,) + (1,) * (latents_w.ndim - 1)
    x0, noise2, t2 = torch.cat([latents_w, latents_l]), noise.repeat(*reps), t.repeat(2)
    cond2 = repeat_cond(cond, 2)
    x_t = model.add_noise(x0, noise2, t2)
    target = model.target(x0, noise2, t2)
    losses = per_sample_error(model.predict(x_t, t2, cond2), target, reduction)
    with model.reference() as ref:
        ref_losses = per_sample_error(model.predict(x_t, t2, cond2, unet=ref), target, reduction).detach()
    lw, ll = losses.chunk(2)
    rw, rl = ref_losses.chunk(2)
    return lw, ll, rw, rl


# -- rewards of a DRAGON run ------------------------------------------------------------------------------------


class DragonRewardTerm(BaseModel):
    """One reward of a DRAGON run (config entry ``objective.rewards[i]``).

    Attributes:
        name: a registered reward (``genalign list rewards``: ``clap``, ``digit_classifier``, ``fad-song``,
            ``fad-dataset``, ``vendi``...), or ``exemplar_fd`` (= ``fad-dataset`` whose reference statistics are
            computed from ``exemplars`` with ``encoder``).
        weight: weight of this term's per-item values in the combined score.
        normalize: per-item normalisation before weighting: none | zscore (within the round) | rank.
        kind: auto (the reward's own ``kind``), instance, or set (scored through leave-one-out credit).
        input: feed the decoded samples (images / waveforms) or the generation latents (VAE-FAD: ``fad-song``
            with ``encoder: frames`` on audio latents).
        encoder: ``digits`` (digit-classifier 128-d features), ``pixels`` (flattened), ``frames`` (``(N, C, T)``
            latents → T frames), or a registered reward with ``embed`` (``clap``); None = the reward's default.
        exemplars: reference set for instance-to-set / set rewards: ``digits:thick`` | ``digits:thin`` |
            ``digits:train`` | ``digits:<0-9>`` | an image folder (metadata.jsonl) | an audio folder | a ``.txt``
            file of captions (CLAP text tower, cross-modal).
        kwargs: constructor arguments of the reward (``tiny``, ``weights``, ``q``...).
    """

    model_config = ConfigDict(extra="forbid")
    name: str
    weight: float = 1.0
    normalize: Literal["none", "zscore", "rank"] = "none"
    kind: Literal["auto", "instance", "set"] = "auto"
    input: Literal["samples", "latents"] = "samples"
    encoder: str | None = None
    exemplars: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)


def thick_digits(fraction: float = 0.25, thin: bool = False, split: str = "train") -> torch.Tensor:
    """Real digits with the most (or least, ``thin``) ink: the top ``fraction`` by mean intensity, ``(M, 3, 8, 8)``.

    An exemplar subset for the digits demo of instance-to-set / set rewards (issue 5 §4).
    """
    from genalign.data.digits import load_digits_split

    x, _ = load_digits_split(split)
    ink = x.mean(dim=(1, 2, 3))
    order = ink.argsort(descending=not thin)
    return x[order[: max(2, int(len(x) * fraction))]]


def load_exemplars(spec: str, resolution: int | None = None, sample_rate: int | None = None):
    """An exemplar set: image tensor ``(M, 3, H, W)`` in [0, 1], waveform tensor ``(M, C, T)``, or a list of texts.

    Raises:
        FileNotFoundError: no such file / folder. ValueError: an unknown ``digits:`` spec or an empty set.
    """
    if spec.startswith("digits:"):
        what = spec.split(":", 1)[1]
        if what in ("thick", "thin"):
            return thick_digits(thin=what == "thin")
        if what.isdigit() and len(what) == 1:
            from genalign.data.digits import load_digits_split

            x, y = load_digits_split("train")
            return x[y == int(what)]
        if what in ("train", "test", "all"):
            from genalign.data.digits import load_digits_split

            return load_digits_split(what)[0]
        raise ValueError(f"exemplars: unknown digits spec {spec!r} (thick, thin, train, test, all, 0-9)")
    p = Path(spec)
    if p.suffix == ".txt":
        texts = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
        if not texts:
            raise ValueError(f"exemplars: {spec!r} has no caption")
        return texts
    if not p.exists():
        raise FileNotFoundError(f"exemplars: {spec!r} not found")
    from genalign.data.audio import AUDIO_SUFFIXES, load_exemplar_folder

    if p.is_dir() and any(f.suffix.lower() in AUDIO_SUFFIXES for f in p.iterdir()):
        return load_exemplar_folder(p, sample_rate=sample_rate or 44_100).waveforms
    from genalign.data.images import load_image_data

    return load_image_data(str(p), resolution or 8).images


class _Encoder(torch.nn.Module):
    def __init__(self, kind: str, device=None, tiny: bool = False):
        super().__init__()
        self.kind = kind
        self.net = None
        if kind == "digits":
            from genalign.rewards.digits import DigitClassifierReward

            self.net = DigitClassifierReward(device=device)
        elif kind not in ("pixels", "frames"):
            from genalign.registry import rewards as REWARDS

            cls = REWARDS.get(kind)
            if not hasattr(cls, "embed"):
                raise ValueError(f"encoder {kind!r}: reward has no embed() method")
            self.net = cls(device=device, tiny=tiny) if "tiny" in cls.__init__.__code__.co_varnames else cls(device=device)

    def forward(self, x, **conditions):
        if self.kind == "digits":
            return self.net.features(x)
        if self.kind == "pixels":
            return x.reshape(x.shape[0], -1).float()
        if self.kind == "frames":
            if x.ndim != 3:
                raise ValueError(f"'frames' encoder expects (N, C, T) latents, got {tuple(x.shape)}")
            return x.transpose(1, 2)
        return self.net.embed(x, **conditions)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        if not hasattr(self.net, "encode_text"):
            raise ValueError(f"text exemplars need a text-capable encoder (clap), got {self.kind!r}")
        return self.net.encode_text(texts)


class RewardTermRuntime:
    """A built :class:`DragonRewardTerm`: per-item values (instance scores or leave-one-out credit) and set values.

    Args:
        spec: the config entry. model: the adapter (VAE for exemplars with ``input: latents``).
        device: reward device.
    """

    def __init__(self, spec: DragonRewardTerm, model, device=None):
        from genalign.registry import rewards as REWARDS
        from genalign.rewards.fad import ReferenceStats

        self.spec = spec
        self.model = model
        name = "fad-dataset" if spec.name == "exemplar_fd" else spec.name
        kw = dict(spec.kwargs)
        encoder = _Encoder(spec.encoder, device, bool(kw.get("tiny", False))) if spec.encoder else None
        if spec.exemplars is not None:
            ex = load_exemplars(spec.exemplars, getattr(model, "resolution", None), getattr(model, "sample_rate", None))
            if encoder is None:
                raise ValueError(f"reward {spec.name!r}: exemplars need an encoder")
            with torch.no_grad():
                if isinstance(ex, list):
                    feats = encoder.embed_texts(ex)
                else:
                    if spec.input == "latents":
                        ex = torch.cat([model.encode(ex[i:i + 32]).float().cpu() for i in range(0, len(ex), 32)])
                    feats = encoder(ex, **self._cond())
            kw["reference"] = ReferenceStats.from_embeddings(feats.detach().cpu(), source=spec.exemplars,
                                                             encoder=spec.encoder or "")
        if encoder is not None:
            kw["encoder"] = encoder
        cls = REWARDS.get(name)
        self.reward = cls(**kw)
        self.kind = spec.kind if spec.kind != "auto" else getattr(self.reward, "kind", "instance")
        if self.kind == "set" and not hasattr(self.reward, "embed"):
            raise ValueError(f"reward {spec.name!r} used as a set reward needs embed() and score_embeddings()")
        self.label = spec.name if not spec.exemplars else f"{spec.name}@{spec.exemplars}"

    def _cond(self) -> dict:
        sr = getattr(self.model, "sample_rate", None)
        return {"sample_rate": sr} if sr else {}

    def set_fn(self, items: torch.Tensor) -> float:
        """r(D) of stacked items (higher is better)."""
        if hasattr(self.reward, "score_embeddings"):
            return float(self.reward.score_embeddings(items))
        raise ValueError(f"{self.label}: no score_embeddings()")

    @torch.no_grad()
    def evaluate(self, samples: torch.Tensor, latents: torch.Tensor, prompts: list[str]) -> dict[str, Any]:
        """``{"kind", "values" (N,) instance scores, or "items" (N, ...) and "value" r(D)}``."""
        x = latents if self.spec.input == "latents" else samples
        if self.kind == "instance":
            return {"kind": "instance", "values": self.reward(x, prompts, **self._cond()).float().cpu().reshape(-1)}
        items = self.reward.embed(x, **self._cond()).detach().float().cpu()
        return {"kind": "set", "items": items, "value": self.set_fn(items)}

    def per_item(self, ev: dict[str, Any]) -> torch.Tensor:
        """(N,) per-item values: instance scores, or leave-one-out credit c_i = r(D) − r(D ∖ {i}) for set rewards."""
        if ev["kind"] == "instance":
            return ev["values"].double()
        return leave_one_out_contributions(ev["items"], self.set_fn)


def _normalize(v: torch.Tensor, mode: str) -> torch.Tensor:
    v = v.double()
    if mode == "zscore":
        return (v - v.mean()) / (v.std(unbiased=False) + 1e-12) if v.numel() > 1 else v * 0
    if mode == "rank":
        from genalign.rewards.composite import rank_normalize

        return rank_normalize(v)
    return v


class DragonData:
    """The current round's demonstrations as model inputs (``n`` changes from round to round).

    Paired: ``batch(idx)`` → ``{"latents_w", "latents_l", "cond"}``; unpaired: ``{"latents", "labels", "cond"}``.
    """

    def __init__(self, objective: "DRAGON"):
        self.obj = objective
        self.skipped: dict[str, int] = {}

    @property
    def n(self) -> int:
        return int(self.obj.demos["n"])

    def batch(self, idx: torch.Tensor) -> dict[str, Any]:
        from genalign.pipelines.base import cond_to

        d, dev = self.obj.demos, self.obj.model.device
        cond = cond_to(_cond_rows(d["cond"], idx), dev)
        if d["paired"]:
            return {"latents_w": d["latents_w"][idx].to(dev), "latents_l": d["latents_l"][idx].to(dev),
                    "cond": cond, "ids": idx.tolist()}
        return {"latents": d["latents"][idx].to(dev), "labels": d["labels"][idx].to(dev), "cond": cond,
                "ids": idx.tolist()}


@_OBJECTIVES.register("dragon", "DRAGON: on-policy D+/D- from instance, instance-to-set and set rewards, "
                                "Diffusion-DPO (paired) or Diffusion-KTO (unpaired) (Bai et al. 2025)")
class DRAGON(Objective):
    """DRAGON's online loop inside the trainer.

    Round r (at the start, then every ``steps_per_round`` optimizer steps): sample ``prompts_per_round`` training
    prompts (``data.source`` ``kind: prompts``), generate ``clips_per_prompt`` samples each with the *current*
    policy (seeded, no grad, latents kept), score every :class:`DragonRewardTerm` (instance rewards per item; set
    rewards on the round's whole set, per-item credit by leave-one-out), combine ``Σ w_k·N_k(value)``, build D+/D−
    (paired for DPO: best vs worst per prompt, or the greedy pairwise split for a single set reward with K = 2;
    unpaired for KTO: combined value above the round median), cache them in ``RUN_DIR/dragon/round{r}.pt``, and
    train on them with Diffusion-DPO (:func:`dragon_dpo_loss`) or Diffusion-KTO (:func:`diffusion_kto_loss`)
    against the frozen reference. The rewards only select demonstrations, they are never differentiated.

    Evaluation: before training the base model (reference) generates ``win_rate_samples_per_prompt`` samples for
    each held-out prompt with fixed seeds; :meth:`summary_metrics` regenerates them with the trained model and
    reports per term the reward before/after and the win rate (instance rewards: per-sample comparison with ties
    ½; set rewards: paired bootstrap subsets, :func:`set_win_rate_bootstrap`) in ``summary.json``
    (``objective_metrics``).

    Source: Bai et al., TMLR 2025 (arXiv 2504.15217); card dragon.md. No official code: the builders, the loss
    choice per reward kind, β, round sizes and the win-rate protocol are [recon] / [unknown → rec.] options.
    """

    class Config(ObjectiveParams):
        rewards: list[DragonRewardTerm] = Field(
            default_factory=list, description="target rewards; empty = the run's `rewards` composite as one "
                                              "instance reward")
        loss: Literal["auto", "dpo", "kto"] = Field(
            "auto", description="auto = DPO-paired when every term is an instance reward, else KTO-unpaired "
                                "[unknown → rec.]")
        beta_dpo: float = Field(5000.0, gt=0, description="Diffusion-DPO β, mean reduction, ½ factor "
                                                          "[unknown → rec.] (image value)")
        beta_kto: float = Field(1000.0, gt=0, description="Diffusion-KTO β, mean reduction [unknown → rec.]")
        half_factor: bool = Field(True, description="½ in the DPO logit [code]")
        reduction: Literal["mean", "sum"] = Field("mean", description="per-sample MSE reduction [code]")
        lambda_desirable: float = Field(1.0, ge=0, description="KTO λ_D [code]")
        lambda_undesirable: float = Field(1.0, ge=0, description="KTO λ_U [code]")
        unpaired_threshold: Literal["median", "mean"] = Field("median", description="D+ = value > threshold [recon]")
        set_pair_builder: Literal["greedy", "best_worst"] = Field(
            "greedy", description="paired + a single set reward: greedy pairwise split (K = 2) or best/worst of "
                                  "leave-one-out credit [recon]")
        tie_tol: float = Field(0.0, ge=0, description="pairs whose best − worst ≤ tie_tol are dropped and counted")
        prompts_per_round: int = Field(32, ge=1, description="P [unknown → rec.] (card: 256)")
        clips_per_prompt: int = Field(4, ge=2, description="K [unknown → rec.] (card: 4; 2 for set-reward pairs)")
        steps_per_round: int | None = Field(None, ge=1, description="optimizer steps per round; None = one pass "
                                                                   "over the round's demonstrations [unknown → rec.]")
        num_inference_steps: int = Field(25, ge=1, description="sampler steps for demonstrations (fewer is fine, "
                                                               "card Fig. 3)")
        guidance_scale: float = Field(1.0, ge=0)
        sample_batch_size: int = Field(64, ge=1)
        win_rate_prompts: str | None = Field(None, description="prompt spec for the win rate; None = "
                                                               "validation.prompts")
        win_rate_samples_per_prompt: int = Field(4, ge=1)
        win_rate_seed: int = Field(4321)
        win_rate_subsets: int = Field(200, ge=1, description="bootstrap subsets for set-reward win rates "
                                                             "[unknown → rec.]")

    needs_reference = True
    needs_reward = True
    data_kind = "prompts"
    data_sources = ("prompts",)

    def __init__(self, config, model):
        super().__init__(config, model)
        self.round = 0
        self.round_start_step = 0
        self.history: list[dict[str, Any]] = []
        self.demos: dict[str, Any] = {"n": 0}
        self.base_eval: dict[str, Any] = {}
        self._ctx: TrainContext | None = None
        self.terms: list[RewardTermRuntime | None] = []

    # -- setup ----------------------------------------------------------------------------------------------
    @property
    def loss_kind(self) -> str:
        """"dpo" or "kto" (``loss: auto`` resolves by reward kinds, card §2.3)."""
        if self.config.loss != "auto":
            return self.config.loss
        return "dpo" if all(t is None or t.kind == "instance" for t in self.terms) else "kto"

    def build_terms(self, ctx_rewards=None) -> None:
        """Build the reward terms (exemplar statistics computed once)."""
        dev = self.model.device
        self.terms = [RewardTermRuntime(t, self.model, dev) for t in self.config.rewards]
        self._composite = ctx_rewards
        if not self.terms:
            if ctx_rewards is None:
                raise ValueError("dragon: no reward (objective.rewards is empty and the run has no `rewards`)")
            self.terms = [None]  # the run's composite

    def build_data(self, ctx: TrainContext) -> DragonData:
        """Prompts, reward terms, the base model's evaluation set and round 0's demonstrations."""
        from genalign.data.prompts import load_prompts

        src = ctx.cfg.data.source
        if src.kind != "prompts":
            raise ValueError(f"data.source.kind: {src.kind!r}: dragon generates on-policy from prompts (kind: prompts)")
        self._ctx = ctx
        self.seed, self.total_steps, self.batch_size = ctx.cfg.seed, ctx.cfg.train.steps, ctx.cfg.train.batch_size
        self.world = getattr(ctx.accelerator, "num_processes", 1)
        self.prompts = load_prompts(src.prompts)
        self.build_terms(ctx.rewards)
        vcfg = ctx.cfg.validation
        self.eval_prompts = [p for p in load_prompts(self.config.win_rate_prompts or vcfg.prompts, vcfg.max_prompts)
                             for _ in range(self.config.win_rate_samples_per_prompt)]
        if not self.base_eval:
            self.base_eval = self.evaluate(self.eval_prompts, use_reference=True)
        self.load_or_generate_round(0)
        return DragonData(self)

    # -- generation and scoring -----------------------------------------------------------------------------
    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        outs = [self.model.decode(latents[i:i + 64].to(self.model.device)).float().cpu()
                for i in range(0, latents.shape[0], 64)]
        return torch.cat(outs)

    def _term_label(self, i: int) -> str:
        t = self.terms[i]
        return "composite" if t is None else t.label

    @torch.no_grad()
    def score(self, samples: torch.Tensor, latents: torch.Tensor, prompts: list[str]) -> list[dict[str, Any]]:
        """Evaluate every term: ``[{"kind", "values" | "items" + "value"}]``."""
        out = []
        for t in self.terms:
            if t is None:
                vals = self._composite.score(samples.to(self.model.device), prompts).float().cpu().reshape(-1)
                out.append({"kind": "instance", "values": vals})
            else:
                out.append(t.evaluate(samples, latents, prompts))
        return out

    def combined_values(self, evals: list[dict[str, Any]]) -> torch.Tensor:
        """(N,) float64 ``Σ_k w_k·N_k(v_k)`` with v_k the instance scores or leave-one-out credits of term k."""
        total = None
        for t, ev in zip(self.terms, evals):
            v = ev["values"].double() if t is None else t.per_item(ev)
            w, norm = (1.0, "none") if t is None else (t.spec.weight, t.spec.normalize)
            v = w * _normalize(v, norm)
            total = v if total is None else total + v
        assert total is not None
        return total

    @torch.no_grad()
    def evaluate(self, prompts: list[str], use_reference: bool = False) -> dict[str, Any]:
        """Fixed-seed samples for ``prompts`` (sample i: seed ``win_rate_seed + i``) scored by every term."""
        c = self.config
        gens = [torch.Generator().manual_seed(c.win_rate_seed + i) for i in range(len(prompts))]
        lat = sample_latents(self.model, prompts, gens, c.num_inference_steps, c.guidance_scale,
                             use_reference=use_reference, batch_size=c.sample_batch_size)
        evals = self.score(self._decode(lat), lat, prompts)
        return {self._term_label(i): ev for i, ev in enumerate(evals)}

    def build_demonstrations(self, latents: torch.Tensor, prompts: list[str], evals: list[dict[str, Any]],
                             num_prompts: int, k: int) -> dict[str, Any]:
        """D+/D− from one round's generations (flat index p·K + j), as configured.

        Returns:
            paired: ``{"paired": True, "latents_w", "latents_l", "prompts", "n", "dropped"}``; unpaired:
            ``{"paired": False, "latents", "labels" (float 0/1), "prompts", "n", "dropped": 0}``.
        """
        c = self.config
        if self.loss_kind == "dpo":
            single_set = len(self.terms) == 1 and self.terms[0] is not None and self.terms[0].kind == "set"
            if single_set and c.set_pair_builder == "greedy":
                if k != 2:
                    raise ValueError("set_pair_builder=greedy needs clips_per_prompt = 2")
                items = evals[0]["items"].reshape(num_prompts, 2, *evals[0]["items"].shape[1:])
                a_pos, _ = greedy_pairwise_split(items[:, 0], items[:, 1], self.terms[0].set_fn)
                pidx = torch.arange(num_prompts)
                ch = pidx * 2 + torch.where(a_pos, 0, 1)
                rj = pidx * 2 + torch.where(a_pos, 1, 0)
                dropped = 0
            else:
                demo = build_paired_best_worst(self.combined_values(evals).view(num_prompts, k), c.tie_tol)
                pidx, ch, rj, dropped = demo.prompt_index, demo.chosen_index, demo.rejected_index, demo.num_dropped
            return {"paired": True, "latents_w": latents[ch], "latents_l": latents[rj],
                    "prompts": [prompts[i] for i in ch.tolist()], "n": int(len(ch)), "dropped": int(dropped)}
        labels = build_unpaired_threshold(self.combined_values(evals), c.unpaired_threshold)
        return {"paired": False, "latents": latents, "labels": labels.float(), "prompts": list(prompts),
                "n": int(latents.shape[0]), "dropped": 0}

    @torch.no_grad()
    def generate_round(self, r: int) -> dict[str, Any]:
        """Generate, score and split round ``r`` with the current policy (deterministic in (seed, r))."""
        c = self.config
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + r)
        P, K = c.prompts_per_round, c.clips_per_prompt
        pick = torch.randint(0, len(self.prompts), (P,), generator=g) if P > len(self.prompts) else \
            torch.randperm(len(self.prompts), generator=g)[:P]
        chosen = [self.prompts[i] for i in pick.tolist()]
        expanded = [p for p in chosen for _ in range(K)]
        gens = [torch.Generator().manual_seed(self.seed * 7_919 + r * 100_003 + i) for i in range(len(expanded))]
        lat = sample_latents(self.model, expanded, gens, c.num_inference_steps, c.guidance_scale,
                             batch_size=c.sample_batch_size)
        evals = self.score(self._decode(lat), lat, expanded)
        demos = self.build_demonstrations(lat, expanded, evals, P, K)
        stats = {"round": r}
        for i, ev in enumerate(evals):
            lab = self._term_label(i)
            stats[f"reward/{lab}"] = float(ev["values"].mean()) if ev["kind"] == "instance" else float(ev["value"])
        stats.update(n_demos=demos["n"], dropped=demos["dropped"])
        if not demos["paired"]:
            stats["n_desirable"] = int(demos["labels"].sum())
        demos["stats"] = json.dumps(stats)
        return demos

    def _round_file(self, r: int) -> Path | None:
        return None if self._ctx is None else Path(self._ctx.run_dir) / "dragon" / f"round{r}.pt"

    def load_or_generate_round(self, r: int) -> None:
        """Round ``r``'s demonstrations: from ``RUN_DIR/dragon/round{r}.pt`` if present (resume), else generated by
        rank 0 with the current policy and saved; conditioning encoded here.

        Raises:
            ValueError: every prompt of the round was a tie (no demonstration).
        """
        path = self._round_file(r)
        acc = getattr(self._ctx, "accelerator", None)
        if path is None:
            demos = self.generate_round(r)
        else:
            if (acc is None or acc.is_main_process) and not path.exists():
                demos = self.generate_round(r)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                torch.save(demos, tmp)
                tmp.replace(path)
            if acc is not None:
                acc.wait_for_everyone()
            demos = torch.load(path, weights_only=True)
        if demos["n"] == 0:
            raise ValueError(f"dragon round {r}: no demonstration (all {demos['dropped']} prompts tied)")
        demos["cond"] = encode_prompts(self.model, demos["prompts"])
        self.demos = demos
        self.round = r
        stats = json.loads(demos["stats"])
        if not any(h.get("round") == r for h in self.history):
            self.history.append(stats)
        logger.info("dragon round %d: %s", r, stats)

    def round_steps(self) -> int:
        """Optimizer steps of the current round (``steps_per_round`` or one pass over its demonstrations)."""
        if self.config.steps_per_round:
            return self.config.steps_per_round
        return max(1, math.ceil(self.demos["n"] / (self.batch_size * self.world)))

    def on_step_end(self, step: int, optimizers: list | None = None) -> None:
        """Trainer hook: start the next round (regenerate on-policy) when the current one is used up."""
        if step - self.round_start_step >= self.round_steps() and step < self.total_steps:
            self.round_start_step = step
            self.load_or_generate_round(self.round + 1)

    # -- loss -----------------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> LossOutput:
        """Diffusion-DPO on (w, l) demonstrations or Diffusion-KTO on labelled ones."""
        c = self.config
        if "latents_w" in batch:
            lw, ll, rw, rl = paired_shared_losses(self.model, batch["latents_w"], batch["latents_l"], batch["cond"],
                                                  generator, reduction=c.reduction)
            loss, metrics = dragon_dpo_loss(lw, ll, rw, rl, beta=c.beta_dpo, half_factor=c.half_factor)
        else:
            out = shared_noise_losses(self.model, batch["latents"], batch["cond"], generator, reduction=c.reduction)
            acc = getattr(self._ctx, "accelerator", None)
            reduce_fn = (lambda z: acc.reduce(z, "mean")) if acc is not None and acc.num_processes > 1 else None
            loss, metrics = diffusion_kto_loss(out.model_losses, out.ref_losses, batch["labels"], beta=c.beta_kto,
                                               lambda_desirable=c.lambda_desirable,
                                               lambda_undesirable=c.lambda_undesirable, reduce_fn=reduce_fn)
        metrics = _floats(metrics)
        metrics.pop("loss", None)
        metrics["round"] = float(self.round)
        for k, v in json.loads(self.demos.get("stats", "{}")).items():
            if k.startswith("reward/"):
                metrics["round_" + k] = float(v)
        return LossOutput(loss, metrics)

    # -- evaluation / state ---------------------------------------------------------------------------------
    def win_rates(self, new: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
        """Per term: reward before/after and the win rate of ``new`` over ``base`` (same prompts and seeds)."""
        out: dict[str, Any] = {}
        for i, t in enumerate(self.terms):
            lab = self._term_label(i)
            b, n = base[lab], new[lab]
            if b["kind"] == "instance":
                out[lab] = {"kind": "instance", "before": float(b["values"].mean()), "after": float(n["values"].mean()),
                            "win_rate": win_rate(n["values"], b["values"]), "method": "per sample, ties 1/2",
                            "n": int(b["values"].numel())}
            else:
                g = torch.Generator().manual_seed(self.config.win_rate_seed)
                wr = set_win_rate_bootstrap(n["items"], b["items"], t.set_fn, num_subsets=self.config.win_rate_subsets,
                                            generator=g)
                out[lab] = {"kind": "set", "before": float(b["value"]), "after": float(n["value"]), "win_rate": wr,
                            "method": f"paired bootstrap, {self.config.win_rate_subsets} half-size subsets",
                            "n": int(b["items"].shape[0])}
        return out

    def summary_metrics(self) -> dict[str, Any]:
        """For summary.json: per-term reward before/after + win rate vs the base model, and the round history."""
        new = self.evaluate(self.eval_prompts, use_reference=False)
        rates = self.win_rates(new, self.base_eval)
        return {"loss": self.loss_kind, "win_rate": {k: v["win_rate"] for k, v in rates.items()}, "terms": rates,
                "rounds": self.history, "eval_samples": len(self.eval_prompts)}

    def state_dict(self) -> dict[str, Any]:
        """Round index/start, round history, and the base model's evaluation (so a resume compares the same)."""
        base = {k: {kk: vv for kk, vv in v.items()} for k, v in self.base_eval.items()}
        return {"round": self.round, "round_start_step": self.round_start_step, "history": json.dumps(self.history),
                "base_eval": base}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the round (its demonstrations are reloaded from the run folder) and the base evaluation."""
        self.round_start_step = int(state.get("round_start_step", 0))
        self.history = json.loads(state.get("history", "[]"))
        self.base_eval = dict(state.get("base_eval", {})) or self.base_eval
        r = int(state.get("round", 0))
        if r != self.round:
            self.load_or_generate_round(r)
