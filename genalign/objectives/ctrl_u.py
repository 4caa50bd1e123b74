"""Ctrl-U — uncertainty-aware reward consistency for ControlNet (Zhang et al., ICLR 2025, arXiv 2410.11236).

Ctrl-U fine-tunes a ControlNet with ControlNet++'s reward-consistency loss (one-step x̂0 → frozen perception
model → per-pixel loss l(p) against the input condition) but weights it per pixel by exp(−U(p)), where U is the
disagreement of the reward model's predictions on two reconstructions of the same sample at adjacent timesteps
(t and t + 1, same noise), and adds +U as a regulariser (Zheng & Yang, IJCV 2021 form)::

    R_i = mean_p[l(p)·exp(−U(p))],  Reg_i = mean_p U(p),  gated masked means over samples with t_min ≤ t ≤ t_max
    seg:         L = L_diff + λ(s)·L_reward + L_reg,           U = u_scale·KL(p_aux ‖ p_primary)
    depth:       L = L_diff + λ(s)·L_reward + u_scale·L_reg,   U = |d_primary − d_aux|
    hed/lineart: L = L_diff + grad_scale·L_reward + u_scale·L_reg, U = |e_primary[:,0] − e_aux[:,0]|

Everything here follows the official code (``grenoble-zhang/Ctrl-U@704d51d``: ``train/ctrlu-reward.py``
L1404–1584, ``train/ctrlu-depth.py`` L1555–1585, ``train/ctrlu-hed.py`` L1555–1584, ``train/utils.py::get_reward_loss``)
and is tagged [code]; it differs from the paper figure in these documented ways: (1) both "generations" share
the same noise and differ only by one timestep (t₂ = min(t₁ + 1, 999)), not two independent noisings; (2) only the
primary (t) branch gets a reward term, the auxiliary branch only feeds U (and still receives gradient through U);
(3) a single KL direction KL(p_aux ‖ p_primary) (``KLDivLoss(log_softmax(primary), softmax(aux))`` summed over
classes), not a symmetrised one; (4) u_scale multiplies U inside the exponent only for segmentation, whereas
depth/edges use the unscaled |·| in the exponent and u_scale only on the regulariser; (5) the regulariser is not
λ-scaled, not ramped, covers all pixels (ignored label pixels included) and U is not detached; (6) the λ ramp
min(1, s/5000) exists only in the segmentation/depth scripts. The only [recon] item is the cost optimisation of
decoding/scoring only gated rows (card §5), which is the caller's business. ``controlnet_pp_reward_loss`` is the
unweighted ControlNet++ variant (``liming-ai/ControlNet_Plus_Plus@9ffe264`` ``train/reward_control.py`` L1504–1521).
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from genalign.config import RewardItem
from genalign.data.conditions import ConditionData, conditions_for_prompts, load_condition_rows
from genalign.objectives.base import LossOutput, Objective, ObjectiveParams, StepResult
from genalign.pipelines.base import repeat_cond
from genalign.pipelines.controlnet import ControlNetAdapter
from genalign.registry import objectives as OBJECTIVES
from genalign.rewards.condition import (
    TASKS,
    build_condition_reward,
    per_image_condition_reward,
    per_pixel_condition_loss,
    validate_condition_pair,
)

__all__ = [
    "ctrl_u_reward_terms",
    "controlnet_pp_reward_loss",
    "lambda_ramp",
    "make_timestep_pair",
    "pair_rows",
    "CtrlU",
    "ControlNetPP",
    "ControlNetSFT",
    "OFFICIAL_RUNS",
]

logger = logging.getLogger(__name__)
_GATE_EPS = 1e-10  # [code] denominator epsilon of every masked mean


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def _primary_timesteps(timesteps: torch.Tensor, B: int) -> torch.Tensor:
    if timesteps.ndim != 1 or timesteps.shape[0] not in (B, 2 * B):
        raise ValueError(
            f"timesteps must have shape ({B},) (primary) or ({2 * B},) (paired [t; t+δ]), got {tuple(timesteps.shape)}"
        )
    return timesteps[:B]


def _gate(timesteps: torch.Tensor, t_min: int, t_max: int) -> torch.Tensor:
    if t_min > t_max:
        raise ValueError(f"t_min ({t_min}) must be <= t_max ({t_max})")
    return ((timesteps >= t_min) & (timesteps <= t_max)).to(torch.float32)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (mask * values).sum() / (mask.sum() + _GATE_EPS)


def controlnet_pp_reward_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    task: str,
    t_min: int,
    t_max: int,
    *,
    ignore_index: int = 255,
) -> Tuple[torch.Tensor, dict]:
    """ControlNet++ reward-consistency loss (unweighted): gated mean over samples of the per-image mean l(p).

    Args:
        pred: reward-model output on x̂0 of the B samples: segmentation (B, K, h, w) logits; depth (B, H, W)
            max-normalised depth; hed/lineart (B, C, H, W) detector maps. Upcast to fp32.
        target: segmentation (B, h, w) integer labels (``ignore_index`` ignored) at the logits' resolution;
            depth (B, H, W) max-normalised condition; hed/lineart (B, C, H, W) detector output on the real image.
        timesteps: (B,) integer timesteps of the samples (or (2B,), of which the first B are used).
        task: "segmentation" | "depth" | "hed" | "lineart".
        t_min, t_max: inclusive reward gate.

    Returns:
        ``(reward_loss, metrics)``: Σ_i mask_i·R_i / (Σ mask + 1e-10), R_i = mean_p l(p) (segmentation: over
        pixels with label ≠ ignore_index); metrics ``reward_loss``, ``num_gated`` (samples in the gate).
        Multiply by λ (``grad_scale``) and add the diffusion loss in the trainer.

    Raises:
        ValueError: unknown task, shape / label-range problems, t_min > t_max.

    Source: ``liming-ai/ControlNet_Plus_Plus@9ffe264`` ``train/reward_control.py`` L1504–1521,
    ``train/utils.py::get_reward_loss``.
    """
    _check_task(task)
    validate_condition_pair(pred, target, task, ignore_index)
    B = pred.shape[0]
    mask = _gate(_primary_timesteps(timesteps, B), t_min, t_max).to(pred.device)
    l = per_pixel_condition_loss(pred.to(torch.float32), target, task, ignore_index)
    loss = _masked_mean(per_image_condition_reward(l, target, task, ignore_index), mask)
    return loss, {"reward_loss": loss.detach(), "num_gated": mask.sum().detach()}


def ctrl_u_reward_terms(
    pred_primary: torch.Tensor,
    pred_aux: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    task: str,
    t_min: int,
    t_max: int,
    u_scale: float,
    *,
    u_scale_in_exponent: Optional[bool] = None,
    reg_scale: Optional[float] = None,
    ignore_index: int = 255,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ctrl-U's uncertainty-weighted reward and regulariser (official code, see module docstring).

    Total loss in the trainer: ``L = L_diff + λ(s)·reward_loss + regulariser`` with λ(s) from
    :func:`lambda_ramp` (the returned regulariser already carries its weight: 1 for segmentation, u_scale otherwise).

    Args:
        pred_primary: reward-model output on the x̂0 of rows [0, B) (timestep t). Shapes as in
            :func:`controlnet_pp_reward_loss` (segmentation (B, K, h, w) logits; depth (B, H, W); hed/lineart
            (B, C, H, W)). Not detached: gradients reach both branches.
        pred_aux: the same for rows [B, 2B) (timestep min(t + δ, 999), same noise). Same shape as pred_primary.
        target: condition target for the B samples (see :func:`controlnet_pp_reward_loss`).
        timesteps: (B,) primary timesteps, or the (2B,) paired timesteps (first B used for the gate).
        task: "segmentation" | "depth" | "hed" | "lineart".
        t_min, t_max: inclusive gate on the primary timestep ([code] 0–400; COCO-Stuff 0–200).
        u_scale: uncertainty scale ([code] 1.0 ADE20K, 0.1 otherwise).
        u_scale_in_exponent: None ⇒ task default ([code]: True for segmentation, False otherwise). If True,
            U = u_scale·U_raw; else U = U_raw.
        reg_scale: weight of the regulariser; None ⇒ task default ([code]: 1.0 when u_scale is in the exponent,
            i.e. segmentation, else u_scale).
        ignore_index: segmentation label excluded from the reward mean (still counted in the regulariser).

    Returns:
        ``(reward_loss, regulariser, uncertainty_map)``:
        reward_loss = Σ_i m_i·mean_p[l(p)·exp(−U(p))] / (Σ m + 1e-10) (seg: mean over pixels with label ≠ 255);
        regulariser = reg_scale · Σ_i m_i·mean_p U(p) / (Σ m + 1e-10) over all pixels;
        uncertainty_map = U, (B, H, W) fp32 with graph (segmentation: u_scale·Σ_k p_aux,k(log p_aux,k −
        log p_primary,k); dense: |pred_primary − pred_aux|, hed/lineart on channel 0 only).

    Raises:
        ValueError: unknown task, primary/aux shape mismatch, target/label problems, t_min > t_max, u_scale < 0.

    Source: Ctrl-U ``train/ctrlu-reward.py`` L1552–1584 (seg), ``train/ctrlu-depth.py`` L1555–1585,
    ``train/ctrlu-hed.py`` L1555–1584 (hed ≡ lineart); ctrl_u.md §2.3–2.4.
    """
    _check_task(task)
    if pred_primary.shape != pred_aux.shape:
        raise ValueError(
            f"pred_primary and pred_aux must have the same shape, got {tuple(pred_primary.shape)} vs "
            f"{tuple(pred_aux.shape)}"
        )
    if u_scale < 0:
        raise ValueError(f"u_scale must be >= 0, got {u_scale}")
    validate_condition_pair(pred_primary, target, task, ignore_index)
    in_exp = (task == "segmentation") if u_scale_in_exponent is None else bool(u_scale_in_exponent)
    if reg_scale is None:
        reg_scale = 1.0 if in_exp else float(u_scale)

    p = pred_primary.to(torch.float32)
    a = pred_aux.to(torch.float32)
    if task == "segmentation":
        log_p = F.log_softmax(p, dim=1)
        log_a = F.log_softmax(a, dim=1)
        u_raw = (log_a.exp() * (log_a - log_p)).sum(dim=1)  # KL(p_aux ‖ p_primary), (B, h, w)
    elif task == "depth":
        u_raw = (p - a).abs()
    else:
        u_raw = (p[:, 0] - a[:, 0]).abs()
    U = u_scale * u_raw if in_exp else u_raw

    B = p.shape[0]
    mask = _gate(_primary_timesteps(timesteps, B), t_min, t_max).to(p.device)
    l = per_pixel_condition_loss(p, target, task, ignore_index)
    reward_loss = _masked_mean(per_image_condition_reward(l, target, task, ignore_index, weight=torch.exp(-U)), mask)
    regulariser = reg_scale * _masked_mean(U.mean(dim=(-1, -2)), mask)
    return reward_loss, regulariser, U


def lambda_ramp(step: int, grad_scale: float, ramp_steps: Optional[int] = 5000) -> float:
    """Reward weight λ(s) = min(1, s / ramp_steps)·grad_scale; constant ``grad_scale`` when ramp_steps is None.

    Args:
        step: completed optimizer steps s ≥ 0 (``global_step`` in the official code).
        grad_scale: final reward weight λ.
        ramp_steps: [code] 5000 for segmentation/depth (``linear_reward_scale_steps``); None for hed/lineart.

    Raises:
        ValueError: step < 0 or ramp_steps ≤ 0.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if ramp_steps is None:
        return float(grad_scale)
    if ramp_steps <= 0:
        raise ValueError(f"ramp_steps must be > 0 or None, got {ramp_steps}")
    return min(1.0, step / ramp_steps) * float(grad_scale)


def make_timestep_pair(timesteps: torch.Tensor, delta_t: int = 1, max_timestep: int = 999) -> torch.Tensor:
    """(B,) → (2B,) = cat(t, min(t + δ, max_timestep)) ([code] ``--add_timestep 1``, clamp to 999)."""
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D, got {tuple(timesteps.shape)}")
    return torch.cat([timesteps, (timesteps + delta_t).clamp(max=max_timestep)], dim=0)


def pair_rows(x: torch.Tensor) -> torch.Tensor:
    """Duplicate a (B, ...) tensor to (2B, ...) = cat(x, x) (latents, noise, text embeddings, condition) [code]."""
    return torch.cat([x, x], dim=0)


# ==============================================================================================================
# Objectives: ctrl_u (uncertainty-weighted), controlnet_pp (unweighted ControlNet++), controlnet_sft (no reward)
# ==============================================================================================================
class ControlNetParams(ObjectiveParams):
    """Fields shared by the ControlNet objectives (data, condition reward, ControlNet init)."""

    reward: RewardItem = Field(default_factory=lambda: RewardItem(name="digit_stroke_mask"),
                               description="the condition reward as a reward member {name, kwargs} (a registered "
                                           "ConditionReward; a bare name is accepted); its weight is grad_scale")
    condition: Literal["derive", "dataset"] = Field(
        "derive", description="derive: condition = reward detector on the real image (digits, hed/lineart); "
                              "dataset: read data.source.condition_column")
    init_controlnet: str = Field("unet", description="'unet' (ControlNetModel.from_unet), 'pipeline' (the base "
                                                     "folder's own ControlNet) or a ControlNet folder / hub id "
                                                     "[unknown → rec.] (official init undocumented, card §3)")
    val_source: str = Field("digits:test", description="held-out (image, condition) source for validation sampling")

    @field_validator("reward", mode="before")
    @classmethod
    def _reward_member(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @field_validator("reward")
    @classmethod
    def _plain_member(cls, v: RewardItem) -> RewardItem:
        if v.weight != 1.0 or v.normalize != "none":
            raise ValueError("objective.reward: weight/normalize do not apply to the condition reward (its weight is "
                             "objective.grad_scale)")
        return v


class ControlNetPPParams(ControlNetParams):
    """ControlNet++ reward-consistency fields (ctrl_u.md §2.1)."""

    grad_scale: float = Field(1.0, ge=0, description="λ, reward weight [code] (ControlNet++: ADE20K 0.5, depth 1.0; "
                                                    "Ctrl-U: ADE20K 0.1, COCO-Stuff 0.2, depth/edges 1.0)")
    t_min: int = Field(0, ge=0, description="inclusive reward gate [code]")
    t_max: int = Field(400, ge=0, description="inclusive reward gate [code] (Ctrl-U 400; ControlNet++ 200)")
    lambda_ramp_steps: int | None = Field(5000, gt=0, description="λ(s) = min(1, s/ramp)·λ [code] seg/depth; "
                                                                  "null = constant (hed/lineart, ControlNet++)")
    ignore_index: int = Field(255, description="segmentation ignore label [code]")
    gate_rows: bool = Field(True, description="decode/score only gated rows (exact optimisation) [recon]")


class CtrlUParams(ControlNetPPParams):
    """Ctrl-U uncertainty fields (ctrl_u.md §2.2–2.4); :meth:`for_run` gives the official per-run values."""

    u_scale: float = Field(0.1, ge=0, description="[code] ADE20K 1.0, others 0.1")
    u_scale_in_exponent: bool | None = Field(None, description="None = task default [code] (True for segmentation)")
    reg_scale: float | None = Field(None, ge=0, description="None = task default [code] (seg 1.0, else u_scale)")
    delta_t: int = Field(1, ge=0, description="auxiliary timestep t + δ [code] --add_timestep")
    max_timestep: int = Field(999, ge=0, description="t + δ clamped [code]")

    @classmethod
    def for_run(cls, run: str, **overrides: Any) -> "CtrlUParams":
        """The official per-run values ([code] ``train/ctrlu_*.sh``, ctrl_u.md §3) for run ∈ {"ade20k",
        "cocostuff", "depth", "hed", "lineart"}; ``overrides`` replace any field.

        Raises:
            ValueError: an unknown run (names the known ones).
        """
        if run not in OFFICIAL_RUNS:
            raise ValueError(f"unknown Ctrl-U run {run!r}; expected one of {sorted(OFFICIAL_RUNS)}")
        return cls(**{**OFFICIAL_RUNS[run], **overrides})


#: [code] per-run values of ``train/ctrlu_*.sh`` (steps, batch, lr, EMA are in the recipes under configs/).
OFFICIAL_RUNS: dict[str, dict[str, Any]] = {
    "ade20k": dict(grad_scale=0.1, u_scale=1.0, t_max=400, condition="dataset",
                   reward={"name": "upernet", "kwargs": {"size": 512, "palette": "ade20k"}},
                   init_controlnet="lllyasviel/control_v11p_sd15_seg"),
    "cocostuff": dict(grad_scale=0.2, u_scale=0.1, t_max=200, condition="dataset",
                      init_controlnet="lllyasviel/control_v11p_sd15_seg"),
    "depth": dict(grad_scale=1.0, u_scale=0.1, t_max=400, condition="dataset", reward="dpt_depth",
                  init_controlnet="lllyasviel/control_v11f1p_sd15_depth"),
    "hed": dict(grad_scale=1.0, u_scale=0.1, t_max=400, lambda_ramp_steps=None,
                init_controlnet="lllyasviel/control_v11p_sd15_softedge"),
    "lineart": dict(grad_scale=1.0, u_scale=0.1, t_max=400, lambda_ramp_steps=None,
                    init_controlnet="lllyasviel/control_v11p_sd15_lineart"),
}


class _ControlNetObjective(Objective):
    """Shared plumbing of the ControlNet objectives: condition reward, data, step counter, validation inputs.

    The trained network is the adapter's ControlNet (``model.denoiser()``; the base class's
    ``trainable_modules`` / ``use_prepared`` hand it to Accelerate through the adapter's verbs).
    """

    Config = ControlNetParams
    data_kind = "images"
    data_sources = ("images",)
    needs_reward = False
    paired = False  # Ctrl-U: 2B rows [t; t+δ]
    use_reward = False

    def __init__(self, config, model):
        super().__init__(config, model)
        if not isinstance(model, ControlNetAdapter):
            raise ValueError(f"objective {type(self).__name__}: needs `pipeline.name: controlnet` (got adapter "
                             f"{type(model).__name__})")
        model.set_controlnet(config.init_controlnet)
        self.reward = build_condition_reward(config.reward.name, config.reward.kwargs, model.device)
        self.task = self.reward.task
        if self.use_reward and not self.reward.differentiable:
            logger.warning("objective.reward %r is not differentiable: the reward terms give no gradient "
                           "(ctrl_u.md §6.7)", config.reward.name)
        self._step = 0
        self._val = None

    # -- data and state ---------------------------------------------------------------------------------------
    def build_data(self, ctx) -> ConditionData:
        """(image, condition, caption) rows from ``data.source`` (kind ``images``), latents cached."""
        src = ctx.cfg.data.source
        images, prompts, conds, labels, skipped = load_condition_rows(
            src.source, self.model.resolution, self.reward, self.config.condition, src.condition_column,
            src.image_column, src.caption_column, src.max_images, seed=ctx.cfg.seed)
        return ConditionData(self.model, images, prompts, conds, self.reward, labels, skipped, seed=ctx.cfg.seed)

    @property
    def step(self) -> int:
        """Completed optimizer steps s (the official ``global_step``), as last reported by :meth:`on_step_end`."""
        return self._step

    def on_step_end(self, step: int) -> StepResult:
        """Trainer hook after optimizer step ``step`` (1-based count of completed steps): the λ-ramp counter."""
        self._step = int(step)
        return StepResult()

    def state_dict(self) -> dict[str, Any]:
        """``{"step": int}`` (the λ-ramp step counter), saved in checkpoints."""
        return {"step": self._step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._step = int(state.get("step", 0))

    def validation_conditions(self, prompts: list[str]) -> torch.Tensor:
        """A held-out condition ``(N, 3, H, W)`` per prompt from ``val_source``: for digit prompts, the
        i-th held-out digit of the prompted class; otherwise rows in order (cyclic)."""
        if self._val is None:
            _, _, conds, labels, _ = load_condition_rows(self.config.val_source, self.model.resolution, self.reward,
                                                         self.config.condition, seed=1)
            self._val = (conds, labels)
        return conditions_for_prompts(*self._val, prompts)

    def sample(self, prompts: list[str], vcfg, generators) -> torch.Tensor:
        """Validation images ``(N, 3, H, W)`` in [0, 1] conditioned on held-out conditions (see
        :meth:`validation_conditions`)."""
        return self.model.sample(prompts, self.validation_conditions(prompts),
                                 num_inference_steps=vcfg.num_inference_steps, guidance_scale=vcfg.guidance_scale,
                                 generator=generators, batch_size=len(prompts))

    # -- loss -------------------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> LossOutput:
        """L_diff (+ λ(s)·reward term (+ regulariser)) on one micro-batch (ctrl_u.md §2)."""
        m, c = self.model, self.config
        z0, cond, target = batch["latents"], batch["cond"], batch["target"]
        B = z0.shape[0]
        step = self.step  # completed optimizer steps, set by the trainer through on_step_end
        noise = torch.randn(z0.shape, generator=generator).to(z0.device)
        t = torch.randint(0, m.num_train_timesteps, (B,), generator=generator).to(z0.device)
        if self.paired:  # [code] cat(t, min(t + δ, 999)); latents, noise, text, condition duplicated
            t_all = make_timestep_pair(t, c.delta_t, c.max_timestep)
            z, n, cond_all = pair_rows(z0), pair_rows(noise), repeat_cond(cond, 2)
        else:
            t_all, z, n, cond_all = t, z0, noise, cond
        x_t = m.add_noise(z, n, t_all)
        pred = m.predict(x_t, t_all, cond_all)
        diff = F.mse_loss(pred.float(), m.target(z, n, t_all).float())  # [code] mean over the whole batch
        metrics = {"diff_loss": diff.item()}
        if not self.use_reward:
            return LossOutput(diff, metrics)
        lam = lambda_ramp(step, c.grad_scale, c.lambda_ramp_steps)
        gate = (t >= c.t_min) & (t <= c.t_max)
        idx = gate.nonzero()[:, 0] if c.gate_rows else torch.arange(B, device=t.device)
        metrics.update({"lambda": lam, "num_gated": float(gate.sum())})
        if idx.numel() == 0:  # nothing in the gate: reward and regulariser are exactly 0 ([code] ε denominator)
            metrics.update({"reward_loss": 0.0, "reward_loss_weighted": 0.0, "reg_loss": 0.0})
            return LossOutput(diff, metrics)
        rows = torch.cat([idx, idx + B]) if self.paired else idx
        x0 = m.x0_from_prediction(x_t[rows], pred[rows], t_all[rows])
        images = m.decode(x0)  # [code] gradient flows through the VAE decoder; clamp to [0, 1]
        rp = self.reward.predict(images)
        tgt = target[idx]
        rp, tgt_all = self.reward.align(rp, torch.cat([tgt, tgt]) if self.paired else tgt)
        k = idx.numel()
        tgt = tgt_all[:k]
        if self.paired:
            r_loss, reg, U = ctrl_u_reward_terms(
                rp[:k], rp[k:], tgt, t[idx], self.task, c.t_min, c.t_max, c.u_scale,
                u_scale_in_exponent=c.u_scale_in_exponent, reg_scale=c.reg_scale, ignore_index=c.ignore_index)
            metrics.update({"reg_loss": reg.item(), "uncertainty": U.detach().mean().item()})
        else:
            r_loss, _ = controlnet_pp_reward_loss(rp, tgt, t[idx], self.task, c.t_min, c.t_max,
                                                  ignore_index=c.ignore_index)
            reg = torch.zeros((), device=diff.device)
        loss = diff + lam * r_loss + reg
        metrics.update({"reward_loss": r_loss.item(), "reward_loss_weighted": lam * r_loss.item()})
        return LossOutput(loss, metrics)


@OBJECTIVES.register("controlnet_sft", "ControlNet baseline: diffusion loss only (no reward term)")
class ControlNetSFT(_ControlNetObjective):
    """Plain ControlNet training on (image, condition, caption): L = mse(ε̂, ε) over the batch. The baseline
    "trained without the reward term" of the Ctrl-U comparison (the condition reward only makes conditions
    and validation inputs)."""

    Config = ControlNetParams


@OBJECTIVES.register("controlnet_pp", "ControlNet++: diffusion loss + λ·reward consistency (unweighted)")
class ControlNetPP(_ControlNetObjective):
    """ControlNet++ (Li et al., ECCV 2024): L = L_diff + λ(s)·L_reward on B rows, L_reward from
    :func:`controlnet_pp_reward_loss` (gated, unweighted). Source: ``liming-ai/ControlNet_Plus_Plus@9ffe264``
    ``train/reward_control.py`` L1504–1521. The λ ramp defaults to Ctrl-U's (5000 steps) so the two differ
    only by the uncertainty; set ``lambda_ramp_steps: null`` for ControlNet++'s constant λ."""

    Config = ControlNetPPParams
    use_reward = True


@OBJECTIVES.register("ctrl_u", "Ctrl-U: uncertainty-weighted reward consistency for ControlNet (ICLR 2025)")
class CtrlU(_ControlNetObjective):
    """Ctrl-U (Zhang et al., ICLR 2025): 2B rows at [t; min(t+δ, 999)] with shared noise; L = L_diff (all 2B
    rows) + λ(s)·mean_p[l·exp(−U)] + reg·mean_p U on the primary rows (:func:`ctrl_u_reward_terms`). Source:
    ``grenoble-zhang/Ctrl-U@704d51d`` ``train/ctrlu-reward.py`` / ``ctrlu-depth.py`` / ``ctrlu-hed.py``."""

    Config = CtrlUParams
    use_reward = True
    paired = True
