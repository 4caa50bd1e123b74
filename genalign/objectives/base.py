"""Objective base class and the shared paired-denoising plumbing of diffusion preference objectives.

An objective declares what it needs (``needs_reference``, ``needs_reward``, ``data_kind``) and a typed
``Config`` (pydantic; every [recon] value of its method card is a field), and computes
``loss(batch, generator) -> LossOutput``. The math lives in a pure function in the same file.

:func:`paired_denoising_losses` implements the batch layout every paired method shares (methods README §1-§2):
one noise draw and one timestep per pair, repeated for winner and loser; a single UNet forward over 2B rows
``[winners; losers]``; per-sample losses reduced from the single 2B-row output, then split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from genalign.pipelines.base import DiffusionAdapter, per_sample_mse, repeat_cond


class ObjectiveParams(BaseModel):
    """Base of every objective's ``Config``: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class LossOutput:
    """A scalar loss to minimise and float metrics to log (names as in the methods README §7)."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class Objective:
    """Base class. Subclasses set the class attributes, a nested ``Config`` and implement :meth:`loss`.

    Args:
        config: an instance of the subclass's ``Config``.
        model: the pipeline adapter being trained.
    """

    Config: ClassVar[type[ObjectiveParams]] = ObjectiveParams
    needs_reference: ClassVar[bool] = False
    needs_reward: ClassVar[bool] = False
    data_kind: ClassVar[str] = "pairs"

    def __init__(self, config: ObjectiveParams, model: DiffusionAdapter):
        self.config = config
        self.model = model

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> LossOutput:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Objective state saved in checkpoints (online objectives: normalisers, buffers). Empty by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


@dataclass
class PairedForward:
    """What :func:`paired_denoising_losses` computed, kept so a reference pass reuses exactly the same inputs."""

    losses_w: torch.Tensor  # (B,)
    losses_l: torch.Tensor  # (B,)
    x_t: torch.Tensor  # (2B, C, h, w)
    timesteps: torch.Tensor  # (2B,)
    target: torch.Tensor  # (2B, C, h, w)
    cond: dict[str, Any]  # 2B rows


def draw_pair_noise(latents_w: torch.Tensor, num_train_timesteps: int, generator: torch.Generator | None = None):
    """One noise tensor ``(B, C, h, w)`` and one timestep ``(B,)`` ~ U{0..T−1} per pair, on the latents' device."""
    b = latents_w.shape[0]
    noise = torch.randn(latents_w.shape, generator=generator, device="cpu").to(latents_w.device)
    t = torch.randint(0, num_train_timesteps, (b,), generator=generator, device="cpu").to(latents_w.device)
    return noise, t


def paired_denoising_losses(model: DiffusionAdapter, latents_w: torch.Tensor, latents_l: torch.Tensor,
                            cond: dict[str, Any], generator: torch.Generator | None = None,
                            reduction: str = "mean") -> PairedForward:
    """Policy per-sample denoising losses of a batch of pairs with shared noise and timestep.

    Args:
        model: the adapter (its trainable UNet is called once on 2B rows).
        latents_w, latents_l: scaled latents ``(B, C, h, w)`` of the chosen / rejected images.
        cond: conditioning for ``B`` rows (repeated ×2 here, so both members see identical conditioning).
        generator: CPU generator for noise and timesteps (seeded by the trainer per step).
        reduction: "mean" (official recipes) or "sum" over C, h, w.

    Returns:
        :class:`PairedForward` with ``losses_w``, ``losses_l`` of shape ``(B,)`` in fp32.

    Source: MaPO ``train.py`` L377–436 and Diffusion-DPO ``train.py`` L1053–1055 (methods README §1-§2).
    """
    if latents_w.shape != latents_l.shape:
        raise ValueError(f"winner/loser latents differ in shape: {tuple(latents_w.shape)} vs {tuple(latents_l.shape)}")
    noise, t = draw_pair_noise(latents_w, model.num_train_timesteps, generator)
    x0 = torch.cat([latents_w, latents_l])
    noise2, t2 = noise.repeat(2, 1, 1, 1), t.repeat(2)
    cond2 = repeat_cond(cond, 2)
    x_t = model.add_noise(x0, noise2, t2)
    target = model.target(x0, noise2, t2)
    pred = model.predict(x_t, t2, cond2)
    losses = per_sample_mse(pred, target, reduction)  # reduce the 2B tensor once, then split
    losses_w, losses_l = losses.chunk(2)
    return PairedForward(losses_w, losses_l, x_t, t2, target, cond2)


def reference_losses(model: DiffusionAdapter, fwd: PairedForward, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Reference per-sample losses ``(B,)``, ``(B,)`` on exactly the policy's inputs, without gradient."""
    with model.reference() as ref_unet:
        pred = model.predict(fwd.x_t, fwd.timesteps, fwd.cond, unet=ref_unet)
        losses = per_sample_mse(pred, fwd.target, reduction)
    return tuple(losses.detach().chunk(2))  # type: ignore[return-value]
