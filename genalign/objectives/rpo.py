"""Sequence-level preference losses for language models: DPO, RPO and f-DPO.

Pure functions on summed completion log-probabilities (no model calls), so every value can be checked by hand.
All inputs are upcast to float32 before any arithmetic (README §5). Shapes: ``B`` = number of preference pairs.

Sources
-------
- DPO: Rafailov et al. 2023, arXiv 2305.18290, Eq. 7; TRL 1.16 ``DPOTrainer`` ``loss_type="sigmoid"``.
- RPO: Liu et al. 2024, arXiv 2405.16436 ("Your SFT loss is implicitly an adversarial regularizer"), main-text
  form and App. F form; code ``YSLIU627/Regularized-Preference-Optimization@d0389c4``. Card: treg.md §2.4.
- f-DPO: Wang et al. 2023, arXiv 2309.16240; scores as in TRL 1.16 ``f_divergence_type``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from genalign.objectives.lm_base import LMLossOutput, LMObjective, LMParams, TokenForward, masked_sum
from genalign.registry import objectives as OBJECTIVES

__all__ = ["dpo_loss", "rpo_loss", "fdpo_loss", "f_divergence_scores", "masked_sum", "F_DIVERGENCES", "DPO", "RPO",
           "FDPO"]

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
SFT_REDUCTIONS = ("sum", "mean", "batch_token_mean")


def _check_pair_shapes(*tensors: torch.Tensor) -> None:
    shape = tensors[0].shape
    if len(shape) != 1:
        raise ValueError(f"expected sequence-level log-probs of shape [B], got {tuple(shape)}")
    for t in tensors[1:]:
        if t.shape != shape:
            raise ValueError(f"shape mismatch: {tuple(t.shape)} vs {tuple(shape)}")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss per pair: ``−logσ(β·[(log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))])``.

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] summed completion log-probs (nats, ≤ 0) under the policy.
        ref_chosen_logps, ref_rejected_logps: [B] the same under the reference (treated as constants: detached).
        beta: KL temperature β > 0 (TRL default 0.1 [code]).

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])``; losses ≥ 0 (ln 2 when policy ≡ reference);
        rewards = β·log-ratio, detached.

    Raises:
        ValueError: on shape mismatch or ``beta <= 0``.

    Source: Rafailov et al. 2023, Eq. 7; TRL 1.16 ``loss_type="sigmoid"``.
    """
    return fdpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, "reverse_kl"
    )


def f_divergence_scores(logratios: torch.Tensor, divergence: str = "reverse_kl", alpha_coef: float = 1.0) -> torch.Tensor:
    """f'(u) evaluated at u = π_θ/π_ref, given ``logratios`` = log u (any shape, float32 out).

    - ``reverse_kl``: log u (standard DPO).
    - ``forward_kl``: 1 − 1/u (Wang et al. write −1/u; the constant cancels in the chosen−rejected difference).
    - ``js_divergence``: log(2u/(1+u)) = log 2 + logσ(log u).
    - ``alpha_divergence``: (u^(a−1) − 1)/(a − 1) with ``a = alpha_coef`` (TRL's ``f_alpha_divergence_coef``;
      the paper's α = 1 − a). ``a = 1`` is the log u limit. The exponent is clamped at 80 (float32 range).

    Raises:
        ValueError: unknown ``divergence``.

    Source: Wang et al. 2023 (arXiv 2309.16240) Table 1; TRL 1.16 ``DPOTrainer._compute_loss``.
    """
    x = logratios.float()
    if divergence == "reverse_kl":
        return x
    if divergence == "forward_kl":
        return 1.0 - torch.exp(-x)
    if divergence == "js_divergence":
        return math.log(2.0) + F.logsigmoid(x)
    if divergence == "alpha_divergence":
        if abs(alpha_coef - 1.0) < 1e-6:
            return x
        t = torch.clamp((alpha_coef - 1.0) * x, max=80.0)
        return (torch.exp(t) - 1.0) / (alpha_coef - 1.0)
    raise ValueError(f"unknown f-divergence {divergence!r}; expected one of {F_DIVERGENCES}")


def fdpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    divergence: str = "reverse_kl",
    alpha_coef: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """f-DPO loss per pair: ``−logσ(β·[f'(u_w) − f'(u_l)])`` with u = π_θ/π_ref (see :func:`f_divergence_scores`).

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: [B] summed log-probs.
        beta: β > 0. divergence: one of ``F_DIVERGENCES``. alpha_coef: TRL's ``f_alpha_divergence_coef``.

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])``; rewards are β·log-ratio (detached), as TRL logs
        them regardless of the divergence.

    Raises:
        ValueError: shape mismatch, ``beta <= 0`` or unknown divergence.

    Source: Wang et al. 2023, arXiv 2309.16240, Thm. 1 / Eq. 10; TRL 1.16.
    """
    _check_pair_shapes(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_lr = policy_chosen_logps.float() - ref_chosen_logps.detach().float()
    rejected_lr = policy_rejected_logps.float() - ref_rejected_logps.detach().float()
    delta = f_divergence_scores(chosen_lr, divergence, alpha_coef) - f_divergence_scores(
        rejected_lr, divergence, alpha_coef
    )
    losses = -F.logsigmoid(beta * delta)
    return losses, beta * chosen_lr.detach(), beta * rejected_lr.detach()


def rpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    alpha: float = 0.005,
    sft_reduction: str = "sum",
    chosen_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RPO = DPO + α·(NLL of the chosen response), three published reductions of the NLL term.

    - ``sum`` (Liu et al. main text, ``rpo_trainer.py``): ``L_DPO − α·β·log π_θ(y_w)`` (summed log-prob, times β).
      Recipe zephyr-7b-beta: α (η) = 0.005, β = 0.01 [code] — the default α here.
    - ``mean`` (App. F / OpenRLHF): ``L_DPO + α·(−log π_θ(y_w)/|y_w|)``, no β (recipe α = 0.2, β = 0.5 [code]).
    - ``batch_token_mean`` (TRL ``loss_type=["sigmoid","sft"]``, ``loss_weights=[1, α]``):
      ``L_DPO + α·(−Σ_b log π_θ(y_w,b) / Σ_b |y_w,b|)``, the same scalar added to every pair.

    Args:
        policy_chosen_logps, ...: [B] summed completion log-probs (nats).
        beta: β > 0. alpha: η ≥ 0, the NLL weight.
        sft_reduction: ``"sum" | "mean" | "batch_token_mean"``.
        chosen_lengths: [B] number of chosen completion tokens; required for ``mean`` and ``batch_token_mean``.

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])`` (rewards as in :func:`dpo_loss`).

    Raises:
        ValueError: unknown reduction, missing ``chosen_lengths``, shape mismatch.

    Source: Liu et al. 2024, arXiv 2405.16436 §4 and App. F; card treg.md §2.4.
    """
    if sft_reduction not in SFT_REDUCTIONS:
        raise ValueError(f"unknown sft_reduction {sft_reduction!r}; expected one of {SFT_REDUCTIONS}")
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    logp_w = policy_chosen_logps.float()
    if sft_reduction == "sum":
        nll = -beta * logp_w
    else:
        if chosen_lengths is None:
            raise ValueError(f"sft_reduction={sft_reduction!r} needs chosen_lengths [B]")
        lengths = chosen_lengths.to(logp_w.device).float()
        if sft_reduction == "mean":
            nll = -logp_w / lengths.clamp(min=1.0)
        else:
            nll = (-logp_w.sum() / lengths.sum().clamp(min=1.0)).expand_as(logp_w)
    return losses + alpha * nll, chosen_rewards, rejected_rewards


# -- registry entries: the TRL trainer (genalign.training.lm) asks these for their loss ---------------------------
@OBJECTIVES.register("dpo", "DPO for (video-)LMs on TRL (Rafailov et al. 2023); diffusion: diffusion_dpo")
class DPO(LMObjective):
    """Sequence-level DPO on summed completion log-probs (:func:`dpo_loss`)."""

    class Config(LMParams):
        """``beta``: β > 0 (TRL default 0.1 [code])."""

        beta: float = Field(0.1, gt=0)

    def lm_loss(self, fwd: TokenForward) -> LMLossOutput:
        (sc, sr, rc, rr), _ = self.sequence_logps(fwd)
        losses, cw, cl = dpo_loss(sc, sr, rc, rr, beta=self.config.beta)
        return LMLossOutput(losses, cw, cl, {"pref_loss": losses})


@OBJECTIVES.register("rpo", "RPO: DPO + NLL on the chosen response (Liu et al. 2024), on TRL")
class RPO(LMObjective):
    """RPO (:func:`rpo_loss`): DPO plus α·NLL of the chosen response in one of three published reductions."""

    class Config(LMParams):
        """``rpo_alpha``: NLL weight η (zephyr recipe 0.005 [code]); ``sft_reduction``: card treg.md §2.4."""

        beta: float = Field(0.1, gt=0)
        rpo_alpha: float = Field(0.005, ge=0)
        sft_reduction: Literal["sum", "mean", "batch_token_mean"] = "sum"

    def lm_loss(self, fwd: TokenForward) -> LMLossOutput:
        (sc, sr, rc, rr), (_, _, _, _, mc, _) = self.sequence_logps(fwd)
        c = self.config
        losses, cw, cl = rpo_loss(sc, sr, rc, rr, beta=c.beta, alpha=c.rpo_alpha, sft_reduction=c.sft_reduction,
                                  chosen_lengths=mc.sum(1))
        return LMLossOutput(losses, cw, cl, {"sft_loss": -sc / mc.sum(1).clamp(min=1)})


@OBJECTIVES.register("fdpo", "f-DPO: DPO with an f-divergence (Wang et al. 2023), on TRL")
class FDPO(LMObjective):
    """f-DPO (:func:`fdpo_loss`)."""

    class Config(LMParams):
        """``f_divergence``: one of ``F_DIVERGENCES``; ``f_alpha_coef``: TRL's ``f_alpha_divergence_coef``."""

        beta: float = Field(0.1, gt=0)
        f_divergence: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = "reverse_kl"
        f_alpha_coef: float = 1.0

    def lm_loss(self, fwd: TokenForward) -> LMLossOutput:
        (sc, sr, rc, rr), _ = self.sequence_logps(fwd)
        c = self.config
        losses, cw, cl = fdpo_loss(sc, sr, rc, rr, beta=c.beta, divergence=c.f_divergence, alpha_coef=c.f_alpha_coef)
        return LMLossOutput(losses, cw, cl, {"pref_loss": losses})
