"""Diffusion-DPO (the baseline): DPO with single-step denoising errors against a frozen reference.

Paper: Wallace et al., *Diffusion Model Alignment Using Direct Preference Optimization*, CVPR 2024,
arXiv 2311.12908, §4 Eq. 14 (½ factor: Supp. S4 Eq. 46). Official code:
``SalesforceAIResearch/DiffusionDPO@5233e75`` ``train.py`` L1118–1146 (genalign default)::

    z_b  = −½·β·[(L_w,b − L_l,b) − (R_w,b − R_l,b)]        L: policy MSE, R: reference MSE (no grad)
    loss = −mean_b logσ(z_b)                               β = 5000 with per-element mean MSE

β convention: the official code uses the per-element mean and the ½ factor, so β = 5000 equals the diffusers
SD1.5 port's ``−logσ(2500·(ref_diff − model_diff))``. With summed errors (``reduction: sum``) use β/D.
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


def diffusion_dpo_loss(model_losses_w: torch.Tensor, model_losses_l: torch.Tensor, ref_losses_w: torch.Tensor,
                       ref_losses_l: torch.Tensor, beta: float = 5000.0, half_factor: bool = True
                       ) -> tuple[torch.Tensor, dict[str, float]]:
    """Diffusion-DPO loss from per-sample denoising losses of policy and reference.

    Args:
        model_losses_w, model_losses_l: policy ``(B,)`` MSEs of chosen / rejected (differentiable).
        ref_losses_w, ref_losses_l: reference ``(B,)`` MSEs at the same x_t, t, conditioning (detached here).
        beta: KL weight β (official 5000 with mean reduction and ``half_factor``).
        half_factor: multiply the logit by ½ as the official code (True) or not (paper pseudocode, False).

    Returns:
        ``(loss, metrics)``: ``implicit_acc`` (mean of z > 0, ties count ½), ``model_diff``, ``ref_diff``,
        ``logit`` (mean z), ``raw_model_loss`` (½(mean L_w + mean L_l)), ``raw_ref_loss``.

    Raises:
        ValueError: the four inputs do not share one ``(B,)`` shape.

    Limits: policy == reference → loss = ln 2; β → 0 → ln 2 with vanishing gradient.
    """
    shapes = {tuple(t.shape) for t in (model_losses_w, model_losses_l, ref_losses_w, ref_losses_l)}
    if len(shapes) != 1 or model_losses_w.ndim != 1:
        raise ValueError(f"expected four (B,) tensors of one shape, got {sorted(shapes)}")
    lw, ll = model_losses_w.float(), model_losses_l.float()
    rw, rl = ref_losses_w.float().detach(), ref_losses_l.float().detach()
    model_diff, ref_diff = lw - ll, rw - rl
    scale = 0.5 * beta if half_factor else beta
    z = -scale * (model_diff - ref_diff)
    loss = -F.logsigmoid(z).mean()
    acc = ((z > 0).float() + 0.5 * (z == 0).float()).mean()
    metrics = {"implicit_acc": acc.item(), "model_diff": model_diff.mean().item(), "ref_diff": ref_diff.mean().item(),
               "logit": z.mean().item(), "raw_model_loss": 0.5 * (lw.mean() + ll.mean()).item(),
               "raw_ref_loss": 0.5 * (rw.mean() + rl.mean()).item()}
    return loss, metrics


@OBJECTIVES.register("diffusion_dpo", "Diffusion-DPO: DPO on denoising errors vs a frozen reference (Wallace et al. 2024)")
class DiffusionDPO(Objective):
    """Diffusion-DPO on preference pairs; the reference is the LoRA-disabled UNet or a frozen copy."""

    class Config(ObjectiveParams):
        beta: float = Field(5000.0, gt=0, description="β, official convention (mean reduction, ½ inside) [code]")
        half_factor: bool = Field(True, description="½ in the logit as the official code [code]")
        reduction: Literal["mean", "sum"] = Field("mean", description="per-sample MSE reduction [code]: mean")

    needs_reference = True
    data_kind = "pairs"

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> LossOutput:
        c = self.config
        # The reference pass runs first (no_grad, adapters off): peak memory is the policy's alone.
        fwd = paired_denoising_losses(self.model, batch["latents_w"], batch["latents_l"], batch["cond"], generator,
                                      reduction=c.reduction, with_reference=True)
        if not getattr(self, "_beta_logged", False):  # once, when the latent size D is first known
            self._beta_logged = True
            d, other = int(batch["latents_w"][0].numel()), "sum" if c.reduction == "mean" else "mean"
            logger.info("diffusion_dpo: beta=%g with %s reduction over D=%d elements = beta=%g with %s reduction",
                        c.beta, c.reduction, d, convert_beta(c.beta, c.reduction, other, d), other)
        loss, metrics = diffusion_dpo_loss(fwd.losses_w, fwd.losses_l, fwd.ref_w, fwd.ref_l, beta=c.beta,
                                           half_factor=c.half_factor)
        return LossOutput(loss, metrics)
