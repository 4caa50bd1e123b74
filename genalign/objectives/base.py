"""The Objective base class: every hook the trainer calls, declared here with a no-op default.

An objective declares what it needs (``needs_reference``, ``needs_reward``, ``data_kind``) and a typed
``Config`` (pydantic; every [recon] value of its method card is a field), and computes
``loss(batch, generator) -> LossOutput``. The math lives in a pure function in the same file; shared diffusion
machinery (noising, targets, per-sample errors, samplers, LoRA folding) lives in :mod:`genalign.pipelines`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from genalign.pipelines.base import DiffusionAdapter


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
class StepResult:
    """What an objective asks of the trainer after an optimizer step (:meth:`Objective.on_step_end`).

    Attributes:
        reset_optimizer_state: clear every optimizer's moments (DDO starts each self-play round from fresh
            AdamW state, as the paper restarts from θ*_n). The trainer does it; objectives never touch optimizers.
    """

    reset_optimizer_state: bool = False


@dataclass
class TrainContext:
    """What an objective may use to build its data: the run config, model, rewards, run folder, accelerator, and
    ``phase(name, total, unit)`` — a context manager yielding an object with ``update(n)`` that shows progress
    (:meth:`genalign.training.progress.RunLog.phase`; a silent one by default)."""

    cfg: Any
    model: Any
    rewards: Any
    run_dir: Path
    accelerator: Any
    phase: Callable[..., Any] | None = None

    def progress(self, name: str, total: int | None = None, unit: str = "it"):
        """``with ctx.progress("generate pairs", total=N, unit="sample") as bar: ... bar.update(k)``."""
        if self.phase is not None:
            return self.phase(name, total=total, unit=unit)
        return contextlib.nullcontext(_Silent())


class _Silent:
    def update(self, n: int = 1) -> None:
        pass


class Objective:
    """Base class. Subclasses set the class attributes, a nested ``Config`` and implement :meth:`loss`.

    The trainer talks to an objective only through the hooks below (each has a default here, so the trainer never
    probes with ``hasattr``), and a new method is one new file:

    - :meth:`build_data` → an object with ``n`` (rows) and ``batch(idx)`` (model-ready dict);
    - :meth:`phases` → the alternating updates of one step (default: one phase, :meth:`loss`);
    - :meth:`trainable_modules` / :meth:`use_prepared` → modules prepared by Accelerate and saved in checkpoints;
    - :meth:`on_step_end` → round boundaries after each optimizer step (returns a :class:`StepResult`);
    - :meth:`sample` → samples for validation rewards; :meth:`summary_metrics` → extra figures for summary.json;
    - :meth:`state_dict` / :meth:`load_state_dict` → online state kept in checkpoints.

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
        """Modules holding trainable parameters (prepared by Accelerate, saved in checkpoints); default: the
        adapter's trainable network (:meth:`DiffusionAdapter.denoiser`)."""
        return [self.model.denoiser()]

    def use_prepared(self, modules: list[torch.nn.Module]) -> None:
        """Receive the Accelerate-wrapped modules (same order as :meth:`trainable_modules`) for the forward pass;
        default: hand the first to the adapter (:meth:`DiffusionAdapter.use_prepared`)."""
        self.model.use_prepared(modules[0])

    def on_step_end(self, step: int) -> StepResult:
        """Called after optimizer step ``step`` (1-based count of completed steps) on every rank; default: nothing."""
        return StepResult()

    def summary_metrics(self) -> dict[str, Any]:
        """Objective-specific figures for ``summary.json`` (DRAGON win rates, DDO rounds); default: none."""
        return {}

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
