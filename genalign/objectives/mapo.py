"""MaPO — Margin-aware Preference Optimization (reference-free), for text-to-image diffusion.

Paper: Hong, Paul, Lee, Rasul, Thorne, Jeong, *Margin-aware Preference Optimization for Aligning Diffusion Models
without Reference*, arXiv 2406.06424 (v1 2024; v2 = AAAI-26, Eq. 9–11).
Official code: ``mapo-t2i/mapo@374b3d3`` ``utils.py::compute_loss`` L286–301 (genalign default).

Official form (per-sample MSE L in fp32, mean over C,H,W; λ = ``beta`` = 0.1, s = ``snr_value`` = 0.5, κ = T)::

    g(y) = y / (e^y − 1)                    bounded in (0, 1), decreasing, g(0+) = 1
    m_b  = g(s·L_w,b) − g(s·L_l,b)           > 0  ⇔  L_w,b < L_l,b
    loss = mean_b L_w,b − mean_b λ·logσ(κ·m_b)

Paper-v2 option ([recon] reading of a garbled equation): φ_β(ℓ) = g(ℓ)^β,
``loss = mean L_w + (1/β)·mean(−logσ(φ_β(L_w) − φ_β(L_l)))``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from genalign.objectives.base import LossOutput, Objective, ObjectiveParams
from genalign.pipelines.denoising import convert_beta, paired_denoising_losses
from genalign.registry import objectives as OBJECTIVES

logger = logging.getLogger(__name__)


def mapo_link(y: torch.Tensor, stable: bool = True) -> torch.Tensor:
    """MaPO's bounded link g(y) = y / (e^y − 1), elementwise; ``stable`` uses expm1 and defines g(0) = 1.

    ``stable=False`` reproduces the official fp32 ops (NaN at exactly 0). Input: any shape, y ≥ 0.
    """
    if not stable:
        return y / (torch.exp(y) - 1)
    zero = y == 0
    y_safe = torch.where(zero, torch.ones_like(y), y)  # keeps the gradient finite at 0
    return torch.where(zero, torch.ones_like(y), y_safe / torch.expm1(y_safe))


def mapo_loss(model_losses_w: torch.Tensor, model_losses_l: torch.Tensor, beta: float = 0.1, snr_value: float = 0.5,
              num_train_timesteps: int = 1000, formulation: str = "official", paper_beta: float = 8.0,
              stable: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """MaPO loss from per-sample denoising losses.

    Args:
        model_losses_w, model_losses_l: ``(B,)`` per-sample MSEs (mean over C,H,W) of chosen / rejected; upcast to fp32.
        beta: margin weight λ (official ``--beta_mapo``, 0.1).
        snr_value: link scale s (official ``--snr_value``, 0.5; a constant, not an SNR).
        num_train_timesteps: logit scale κ = T (official: the scheduler's ``num_train_timesteps``).
        formulation: "official" (code, default) or "paper_v2" (uses ``paper_beta``; [recon]).
        paper_beta: β of the paper-v2 form (Table 4: 8 for general preference).
        stable: evaluate g with expm1 and g(0) = 1 (official ops when False).

    Returns:
        ``(loss, metrics)``: scalar loss; metrics ``sft_loss`` (mean L_w), ``pref_loss`` (margin term, λ included),
        ``win_score`` / ``lose_score`` (mean g), ``margin``, ``pref_accuracy`` (fraction of m > 0), ``loser_loss``.

    Raises:
        ValueError: shape mismatch or unknown formulation.

    Example: L_w = L_l → loss = mean L_w + λ·ln 2 (official form).
    """
    if model_losses_w.shape != model_losses_l.shape or model_losses_w.ndim != 1:
        raise ValueError(f"expected two (B,) tensors, got {tuple(model_losses_w.shape)} and {tuple(model_losses_l.shape)}")
    lw, ll = model_losses_w.float(), model_losses_l.float()
    if formulation == "official":
        sw, sl = mapo_link(snr_value * lw, stable), mapo_link(snr_value * ll, stable)
        margin = sw - sl
        pref = -(beta * F.logsigmoid(num_train_timesteps * margin)).mean()
    elif formulation == "paper_v2":
        sw, sl = mapo_link(lw, stable).pow(paper_beta), mapo_link(ll, stable).pow(paper_beta)
        margin = sw - sl
        pref = -F.logsigmoid(margin).mean() / paper_beta
    else:
        raise ValueError(f"formulation must be 'official' or 'paper_v2', got {formulation!r}")
    sft = lw.mean()
    loss = sft + pref
    metrics = {"sft_loss": sft.item(), "pref_loss": pref.item(), "win_score": sw.mean().item(),
               "lose_score": sl.mean().item(), "margin": margin.mean().item(),
               "pref_accuracy": (margin > 0).float().mean().item(), "loser_loss": ll.mean().item()}
    return loss, metrics


@OBJECTIVES.register("mapo", "MaPO: reference-free margin loss + SFT on winners (Hong et al. 2024)")
class MaPO(Objective):
    """MaPO on preference pairs (offline Pick-a-Pic-style or on-policy). No reference model."""

    class Config(ObjectiveParams):
        beta: float = Field(0.1, ge=0, description="margin weight λ (official --beta_mapo) [code]")
        snr_value: float = Field(0.5, gt=0, description="link scale s (official --snr_value) [code]")
        logit_scale: float | None = Field(None, gt=0, description="κ; None = num_train_timesteps (1000) [code]")
        formulation: Literal["official", "paper_v2"] = "official"
        paper_beta: float = Field(8.0, gt=0, description="β of the paper-v2 form [recon]")
        stable: bool = True
        reduction: Literal["mean"] = Field("mean", description="MaPO's link saturates at sum scale: mean only")

    needs_reference = False
    data_kind = "pairs"

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> LossOutput:
        c = self.config
        fwd = paired_denoising_losses(self.model, batch["latents_w"], batch["latents_l"], batch["cond"], generator)
        if not getattr(self, "_scale_logged", False):  # once, when the latent size D is first known
            self._scale_logged = True
            d, kappa = int(batch["latents_w"][0].numel()), c.logit_scale or self.model.num_train_timesteps
            logger.info("mapo: kappa=%g and s=%g on mean-reduced errors over D=%d elements = kappa=%g and s=%g on "
                        "sum-reduced errors (genalign trains MaPO with mean reduction only)", kappa, c.snr_value, d,
                        convert_beta(kappa, "mean", "sum", d), convert_beta(c.snr_value, "mean", "sum", d))
        loss, metrics = mapo_loss(fwd.losses_w, fwd.losses_l, beta=c.beta, snr_value=c.snr_value,
                                  num_train_timesteps=c.logit_scale or self.model.num_train_timesteps,
                                  formulation=c.formulation, paper_beta=c.paper_beta, stable=c.stable)
        return LossOutput(loss, metrics)
