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
from pathlib import Path
from typing import Any, Callable, ClassVar

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


@dataclass
class Phase:
    """One alternating update of a step (DI*: fake-score then generator): its parameters, loss and optimizer.

    Attributes:
        name: logged as ``<name>/<metric>`` when an objective has more than one phase.
        params: the parameters this phase's optimizer updates.
        loss: ``loss(batch, generator) -> LossOutput``.
        learning_rate: overrides ``train.learning_rate`` for this phase when set.
    """

    name: str
    params: list[torch.nn.Parameter]
    loss: Callable[[dict[str, Any], torch.Generator | None], LossOutput]
    learning_rate: float | None = None


@dataclass
class TrainContext:
    """What an objective may use to build its data: the run config, model, rewards, run folder, accelerator."""

    cfg: Any
    model: Any
    rewards: Any
    run_dir: Path
    accelerator: Any


class Objective:
    """Base class. Subclasses set the class attributes, a nested ``Config`` and implement :meth:`loss`.

    The trainer talks to an objective only through the hooks below, so a new method is one new file:

    - :meth:`build_data` → an object with ``n`` (rows) and ``batch(idx)`` (model-ready dict);
    - :meth:`phases` → the alternating updates of one step (default: one phase, :meth:`loss`);
    - :meth:`trainable_modules` → modules prepared by Accelerate and saved in checkpoints;
    - :meth:`sample` → images for validation rewards; :meth:`state_dict` → online state kept in checkpoints.

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
        """The objective on one micro-batch (subclasses implement it)."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss() or phases()")

    def build_data(self, ctx: TrainContext):
        """Training data for this objective; default: preference pairs (offline or on-policy), latents cached."""
        from genalign.data.batches import build_default_data

        return build_default_data(ctx, self.data_kind)

    def phases(self) -> list[Phase]:
        """The updates of one training step, in order (default: one phase over the adapter's trainable params)."""
        return [Phase("main", self.model.trainable_parameters(), self.loss)]

    def trainable_modules(self) -> list[torch.nn.Module]:
        """Modules holding trainable parameters (prepared by Accelerate, saved in checkpoints)."""
        return [self.model.unet]

    def use_prepared(self, modules: list[torch.nn.Module]) -> None:
        """Receive the Accelerate-wrapped modules (same order as :meth:`trainable_modules`) for the forward pass."""
        self.model._raw_unet = self.model.unet
        self.model.unet = modules[0]

    def sample(self, prompts: list[str], vcfg, generators: list[torch.Generator]) -> torch.Tensor:
        """Images ``(N, 3, H, W)`` in [0, 1] for validation; default: the pipeline's own sampler."""
        return self.model.sample(prompts, num_inference_steps=vcfg.num_inference_steps,
                                 guidance_scale=vcfg.guidance_scale, generator=generators, batch_size=len(prompts))

    def state_dict(self) -> dict[str, Any]:
        """Objective state saved in checkpoints (online objectives: normalisers, reference round, buffers).
        Tensors, numbers, strings, lists and dicts only (it is loaded with ``weights_only=True``)."""
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
