"""SFT baseline: the ordinary denoising loss on the chosen images only (the "SFT (chosen)" rows of MaPO/DPO tables).

loss = mean_b L_w,b with L the per-sample MSE to the epsilon / v target (fp32). Uses the same pair batches and
noise draws as the preference objectives so runs are comparable step for step.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from genalign.objectives.base import LossOutput, Objective, ObjectiveParams
from genalign.pipelines.denoising import draw_noise, per_sample_error
from genalign.registry import objectives as OBJECTIVES


def sft_loss(model_losses_w: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean of the chosen images' per-sample denoising losses ``(B,)`` → ``(loss, {"sft_loss"})``."""
    loss = model_losses_w.float().mean()
    return loss, {"sft_loss": loss.item()}


@OBJECTIVES.register("sft", "SFT on the chosen images only (denoising loss), the usual baseline")
class SFT(Objective):
    """Supervised fine-tuning on winners (no reference, no loser)."""

    class Config(ObjectiveParams):
        reduction: Literal["mean", "sum"] = Field("mean")

    data_kind = "pairs"

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> LossOutput:
        x0 = batch["latents_w"]
        noise, t = draw_noise(x0, self.model.num_train_timesteps, generator)
        pred = self.model.predict(self.model.add_noise(x0, noise, t), t, batch["cond"])
        losses = per_sample_error(pred, self.model.target(x0, noise, t), self.config.reduction)
        return LossOutput(*sft_loss(losses))
