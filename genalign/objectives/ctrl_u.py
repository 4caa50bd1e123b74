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

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from genalign.rewards.condition import (  # noqa: E402  shared with the condition rewards
    normalize_depth_by_max,
    per_image_condition_reward as _per_image_reward,
    per_pixel_condition_loss as _per_pixel_loss,
)


__all__ = [
    "CtrlUConfig",
    "ctrl_u_reward_terms",
    "controlnet_pp_reward_loss",
    "lambda_ramp",
    "x0_from_epsilon",
    "make_timestep_pair",
    "pair_rows",
    "normalize_depth_by_max",
    "TASKS",
    "ConditionData",
    "load_condition_rows",
    "CtrlU",
    "ControlNetPP",
    "ControlNetSFT",
]

TASKS = ("segmentation", "depth", "hed", "lineart")
_GATE_EPS = 1e-10  # [code] denominator epsilon of every masked mean


@dataclass
class CtrlUConfig:
    """Ctrl-U hyperparameters with provenance tags (ctrl_u.md §3). Defaults = the depth run; see :meth:`for_run`."""

    task: str = "depth"  # [code] segmentation | depth | hed | lineart
    grad_scale: float = 1.0  # [code] λ (reward weight): ADE20K 0.1, COCO-Stuff 0.2, depth/hed/lineart 1.0
    u_scale: float = 0.1  # [code] ADE20K 1.0, others 0.1
    u_scale_in_exponent: Optional[bool] = None  # [code] None ⇒ task default (True only for segmentation)
    reg_scale: Optional[float] = None  # [code] None ⇒ task default (seg 1.0; depth/edges u_scale)
    t_min: int = 0  # [code] min_timestep_rewarding (inclusive)
    t_max: int = 400  # [code] max_timestep_rewarding (inclusive): COCO-Stuff 200, others 400
    lambda_ramp_steps: Optional[int] = 5000  # [code] seg/depth: min(1, s/5000); hed/lineart: None (constant)
    delta_t: int = 1  # [code] --add_timestep
    max_timestep: int = 999  # [code] t + δ clamped to 999
    ignore_index: int = 255  # [code] segmentation ignore label
    max_train_steps: int = 55001  # [code] ADE20K 35,001, COCO-Stuff 40,001, depth 55,001, hed/lineart 50,001
    train_batch_size: int = 4  # [code]
    gradient_accumulation_steps: int = 8  # [code] seg 4, others 8
    learning_rate: float = 1e-5  # [code] constant_with_warmup
    lr_warmup_steps: int = 2000  # [code]
    adam_weight_decay: float = 1e-2  # [code] AdamW (0.9, 0.999), eps 1e-8
    max_grad_norm: float = 1.0  # [code]
    ema_decay: float = 0.9999  # [code] diffusers EMAModel with (1+s)/(10+s) warmup
    resolution: int = 512  # [code]
    init_controlnet: str = "lllyasviel/control_v11f1p_sd15_depth"  # [unknown → rec.] official init undocumented

    @classmethod
    def for_run(cls, run: str) -> "CtrlUConfig":
        """Official per-run defaults: run ∈ {"ade20k", "cocostuff", "depth", "hed", "lineart"} ([code] ctrlu_*.sh)."""
        table = {
            "ade20k": dict(task="segmentation", grad_scale=0.1, u_scale=1.0, t_max=400, max_train_steps=35001,
                           gradient_accumulation_steps=4, init_controlnet="lllyasviel/control_v11p_sd15_seg"),
            "cocostuff": dict(task="segmentation", grad_scale=0.2, u_scale=0.1, t_max=200, max_train_steps=40001,
                              gradient_accumulation_steps=4, init_controlnet="lllyasviel/control_v11p_sd15_seg"),
            "depth": dict(task="depth"),
            "hed": dict(task="hed", lambda_ramp_steps=None, max_train_steps=50001,
                        init_controlnet="lllyasviel/control_v11p_sd15_softedge"),
            "lineart": dict(task="lineart", lambda_ramp_steps=None, max_train_steps=50001,
                            init_controlnet="lllyasviel/control_v11p_sd15_lineart"),
        }
        if run not in table:
            raise ValueError(f"unknown Ctrl-U run {run!r}; expected one of {sorted(table)}")
        return cls(**table[run])


# --------------------------------------------------------------------------------------------------------------


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


def _validate_preds(pred: torch.Tensor, target: torch.Tensor, task: str, ignore_index: int) -> None:
    if task == "segmentation":
        if pred.ndim != 4:
            raise ValueError(f"segmentation predictions must be (B, K, h, w) logits, got {tuple(pred.shape)}")
        if target.ndim != 3 or target.shape[0] != pred.shape[0] or target.shape[-2:] != pred.shape[-2:]:
            raise ValueError(
                f"segmentation target must be (B, h, w) labels at the logits' resolution {tuple(pred.shape[-2:])} "
                f"(nearest-resize labels first), got {tuple(target.shape)}"
            )
        if target.dtype.is_floating_point:
            raise ValueError("segmentation target must be an integer label map")
        bad = (target != ignore_index) & ((target < 0) | (target >= pred.shape[1]))
        if bad.any():
            raise ValueError(f"segmentation labels must be in [0, {pred.shape[1]}) or {ignore_index}")
    elif task == "depth":
        if pred.ndim != 3 or target.shape != pred.shape:
            raise ValueError(
                f"depth predictions and target must both be (B, H, W) max-normalised maps, got "
                f"{tuple(pred.shape)} and {tuple(target.shape)}"
            )
    else:
        if pred.ndim != 4 or target.shape != pred.shape:
            raise ValueError(
                f"{task} predictions and target must both be (B, C, H, W) detector maps, got "
                f"{tuple(pred.shape)} and {tuple(target.shape)}"
            )


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
    _validate_preds(pred, target, task, ignore_index)
    B = pred.shape[0]
    mask = _gate(_primary_timesteps(timesteps, B), t_min, t_max).to(pred.device)
    l = _per_pixel_loss(pred.to(torch.float32), target, task, ignore_index)
    loss = _masked_mean(_per_image_reward(l, target, task, ignore_index), mask)
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
    _validate_preds(pred_primary, target, task, ignore_index)
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
    l = _per_pixel_loss(p, target, task, ignore_index)
    reward_loss = _masked_mean(_per_image_reward(l, target, task, ignore_index, weight=torch.exp(-U)), mask)
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


def x0_from_epsilon(
    z_t: torch.Tensor, eps_hat: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """One-step reconstruction ẑ0 = (z_t − sqrt(1 − ᾱ_t)·ε̂)/sqrt(ᾱ_t) in fp32 (no clipping).

    Equals ``DDPMScheduler.step(eps_hat, t, z_t).pred_original_sample`` with ``clip_sample=False``, without
    depending on a scheduler config. Args: ``z_t``, ``eps_hat`` (B, ...); ``timesteps`` (B,) integer indices into
    ``alphas_cumprod`` (T,). Gradient flows into ``eps_hat`` (and ``z_t``). Raises ValueError on shape mismatch
    or out-of-range timesteps.
    """
    if z_t.shape != eps_hat.shape:
        raise ValueError(f"z_t and eps_hat shapes differ: {tuple(z_t.shape)} vs {tuple(eps_hat.shape)}")
    if timesteps.ndim != 1 or timesteps.shape[0] != z_t.shape[0]:
        raise ValueError(f"timesteps must have shape ({z_t.shape[0]},), got {tuple(timesteps.shape)}")
    if alphas_cumprod.ndim != 1:
        raise ValueError("alphas_cumprod must be 1-D")
    t = timesteps.long().to(alphas_cumprod.device)
    if (t < 0).any() or (t >= alphas_cumprod.shape[0]).any():
        raise ValueError(f"timesteps must lie in [0, {alphas_cumprod.shape[0] - 1}]")
    ab = alphas_cumprod.to(torch.float32)[t].to(z_t.device).view((-1,) + (1,) * (z_t.ndim - 1))
    return (z_t.to(torch.float32) - torch.sqrt(1 - ab) * eps_hat.to(torch.float32)) / torch.sqrt(ab)


def make_timestep_pair(timesteps: torch.Tensor, delta_t: int = 1, max_timestep: int = 999) -> torch.Tensor:
    """(B,) → (2B,) = cat(t, min(t + δ, max_timestep)) ([code] ``--add_timestep 1``, clamp to 999)."""
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D, got {tuple(timesteps.shape)}")
    return torch.cat([timesteps, (timesteps + delta_t).clamp(max=max_timestep)], dim=0)


def pair_rows(x: torch.Tensor) -> torch.Tensor:
    """Duplicate a (B, ...) tensor to (2B, ...) = cat(x, x) (latents, noise, text embeddings, condition) [code]."""
    return torch.cat([x, x], dim=0)


class ConditionData:
    """(image, condition, caption) rows as model inputs: cached latents, text conditioning, condition images and
    the reward target of each condition.

    Attributes:
        n: rows. latents: ``(N, 4, h, w)`` scaled VAE posterior samples (drawn once with a seeded generator —
            the official code re-samples every step; [recon]). conditions: ``(N, 3, H, W)`` in [0, 1].
        targets: reward target per row (``reward.target_from_condition``): labels ``(N, H, W)`` int64, depth
            ``(N, H, W)``, edges ``(N, 1, H, W)``. cond: text conditioning dict of ``(N, ...)`` tensors.
        prompts, labels (digits only), skipped (rows dropped while loading, by reason).
    """

    def __init__(self, model, images: torch.Tensor, prompts: list[str], conditions: torch.Tensor, reward,
                 labels: torch.Tensor | None = None, skipped: dict | None = None, seed: int = 0, chunk: int = 64):
        self.model, self.prompts, self.labels = model, list(prompts), labels
        self.skipped = dict(skipped or {})
        self.n = len(self.prompts)
        self.conditions = conditions.float().cpu()
        g = torch.Generator().manual_seed(seed)
        lat, conds, tg = [], [], []
        with torch.no_grad():
            for i in range(0, self.n, chunk):
                x = images[i:i + chunk].to(model.device)
                lat.append(model.encode(x, generator=g).cpu())
                conds.append({k: v.cpu() for k, v in model.encode_prompt(self.prompts[i:i + chunk]).items()})
                c = self.conditions[i:i + chunk].to(model.device)
                real = x if reward.task in ("hed", "lineart") else None  # edges: detector on the real image (§4)
                tg.append(reward.target_from_condition(c, real).cpu())
        self.latents = torch.cat(lat)
        self.cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
        self.targets = torch.cat(tg)

    def batch(self, idx: torch.Tensor) -> dict[str, Any]:
        """``{"latents": (B, 4, h, w), "cond": {..., "controlnet_cond": (B, 3, H, W)}, "target", "ids"}``."""
        dev = self.model.device
        cond = {k: v[idx].to(dev) for k, v in self.cond.items()}
        cond["controlnet_cond"] = self.conditions[idx].to(dev)
        return {"latents": self.latents[idx].to(dev), "cond": cond, "target": self.targets[idx].to(dev),
                "ids": idx.tolist()}


def load_condition_rows(source: str, resolution: int, reward, condition: str = "derive",
                        condition_column: str | None = None, image_column: str = "image",
                        caption_column: str = "prompt", max_images: int | None = None, seed: int = 0):
    """Real images, prompts and condition images ``(N, 3, H, W)`` in [0, 1] from an ``images`` data source.

    Args:
        source: ``digits:train`` / ``digits:test``, a folder with ``metadata.jsonl`` (``file_name``, ``prompt``,
            ``condition``), a parquet folder or a `datasets` id (see :func:`genalign.data.images.load_image_data`).
        reward: the condition reward (its detector makes conditions when ``condition="derive"``).
        condition: "derive" (condition = ``reward.condition_from_image(real image)``, card §4 HED/lineart and the
            digits demo) or "dataset" (read ``condition_column``).

    Returns:
        ``(images, prompts, conditions, labels_or_None, skipped)``.

    Raises:
        ValueError: ``condition="dataset"`` without a condition column in the data.
    """
    from genalign.data.images import load_image_data

    data = load_image_data(source, resolution, image_column=image_column, caption_column=caption_column,
                           condition_column=condition_column if condition == "dataset" else None,
                           max_images=max_images, seed=seed)
    if condition == "dataset":
        if data.conditions is None:
            raise ValueError(f"data.source {source!r}: objective.condition 'dataset' needs condition images "
                             "(data.source.condition_column); use condition: derive to make them with the reward")
        conds = data.conditions
    else:
        p = next(iter(reward.parameters()), None)
        dev = p.device if p is not None else torch.device("cpu")
        conds = torch.cat([reward.condition_from_image(data.images[i:i + 64].to(dev)).cpu()
                           for i in range(0, len(data), 64)])
    return data.images, data.prompts, conds, data.labels, data.skipped


# ==============================================================================================================
# Objectives: ctrl_u (uncertainty-weighted), controlnet_pp (unweighted ControlNet++), controlnet_sft (no reward)
# ==============================================================================================================
import logging  # noqa: E402
from typing import Any, Literal  # noqa: E402

from pydantic import Field  # noqa: E402

from genalign.objectives.base import LossOutput, Objective, ObjectiveParams  # noqa: E402
from genalign.registry import objectives as _OBJECTIVES  # noqa: E402

logger = logging.getLogger(__name__)


class ControlNetParams(ObjectiveParams):
    """Fields shared by the ControlNet objectives (data, condition reward, ControlNet init)."""

    reward: str = Field("digit_stroke_mask", description="condition reward (reward registry; a ConditionReward)")
    reward_kwargs: dict[str, Any] = Field(default_factory=dict, description="its constructor args (weights, tiny...)")
    condition: Literal["derive", "dataset"] = Field(
        "derive", description="derive: condition = reward detector on the real image (digits, hed/lineart); "
                              "dataset: read data.source.condition_column")
    init_controlnet: str = Field("unet", description="'unet' (ControlNetModel.from_unet), 'pipeline' (the base "
                                                     "folder's own ControlNet) or a ControlNet folder / hub id "
                                                     "[unknown → rec.] (official init undocumented, card §3)")
    val_source: str = Field("digits:test", description="held-out (image, condition) source for validation sampling")


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
    """Ctrl-U uncertainty fields (ctrl_u.md §2.2–2.4)."""

    u_scale: float = Field(0.1, ge=0, description="[code] ADE20K 1.0, others 0.1")
    u_scale_in_exponent: bool | None = Field(None, description="None = task default [code] (True for segmentation)")
    reg_scale: float | None = Field(None, ge=0, description="None = task default [code] (seg 1.0, else u_scale)")
    delta_t: int = Field(1, ge=0, description="auxiliary timestep t + δ [code] --add_timestep")
    max_timestep: int = Field(999, ge=0, description="t + δ clamped [code]")


class _ControlNetObjective(Objective):
    """Shared plumbing of the ControlNet objectives: condition reward, data, step counter, sampling, modules."""

    Config = ControlNetParams
    data_kind = "images"
    data_sources = ("images",)
    needs_reward = False
    paired = False  # Ctrl-U: 2B rows [t; t+δ]
    use_reward = False

    def __init__(self, config, model):
        super().__init__(config, model)
        if not hasattr(model, "controlnet"):
            raise ValueError(f"objective {type(self).__name__}: needs `pipeline.name: controlnet` (got adapter "
                             f"{type(model).__name__})")
        model.set_controlnet(config.init_controlnet)
        from genalign.rewards.composite import _build_reward
        from genalign.rewards.condition import ConditionReward

        self.reward = _build_reward(config.reward, dict(config.reward_kwargs), {}, model.device)
        if not isinstance(self.reward, ConditionReward):
            raise ValueError(f"objective.reward: {config.reward!r} is not a condition reward (ConditionReward)")
        self.task = self.reward.task
        if self.use_reward and not self.reward.differentiable:
            logger.warning("objective.reward %r is not differentiable: the reward terms give no gradient "
                           "(ctrl_u.md §6.7)", config.reward)
        self._calls = 0
        self._accum = 1
        self._val = None

    # -- data -------------------------------------------------------------------------------------------------
    def build_data(self, ctx) -> ConditionData:
        """(image, condition, caption) rows from ``data.source`` (kind ``images``), latents cached."""
        src = ctx.cfg.data.source
        self._accum = ctx.cfg.train.gradient_accumulation_steps
        images, prompts, conds, labels, skipped = load_condition_rows(
            src.source, self.model.resolution, self.reward, self.config.condition, src.condition_column,
            src.image_column, src.caption_column, src.max_images, seed=ctx.cfg.seed)
        return ConditionData(self.model, images, prompts, conds, self.reward, labels, skipped, seed=ctx.cfg.seed)

    @property
    def step(self) -> int:
        """Completed optimizer steps s (micro-batch calls // gradient accumulation)."""
        return self._calls // max(1, self._accum)

    def state_dict(self) -> dict[str, Any]:
        """``{"loss_calls": int}`` (the λ-ramp step counter), saved in checkpoints."""
        return {"loss_calls": self._calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._calls = int(state.get("loss_calls", 0))

    def trainable_modules(self) -> list[torch.nn.Module]:
        """The raw ControlNet (prepared by Accelerate, saved in checkpoints)."""
        return [self.model._raw_controlnet]

    def use_prepared(self, modules: list[torch.nn.Module]) -> None:
        """Forward through the Accelerate-wrapped ControlNet."""
        self.model.controlnet = modules[0]

    def validation_conditions(self, prompts: list[str]) -> torch.Tensor:
        """A held-out condition ``(N, 3, H, W)`` per prompt from ``val_source``: for digit prompts, the
        i-th held-out digit of the prompted class; otherwise rows in order (cyclic)."""
        if self._val is None:
            images, vprompts, conds, labels, _ = load_condition_rows(
                self.config.val_source, self.model.resolution, self.reward, self.config.condition,
                seed=1)
            self._val = (conds, labels)
        conds, labels = self._val
        out = []
        for i, p in enumerate(prompts):
            j = i % len(conds)
            if labels is not None:
                from genalign.data.digits import digit_of_prompt

                try:
                    rows = (labels == digit_of_prompt(p)).nonzero()[:, 0]
                    j = int(rows[i % len(rows)])
                except ValueError:
                    pass
            out.append(conds[j])
        return torch.stack(out)

    def sample(self, prompts: list[str], vcfg, generators) -> torch.Tensor:
        """Validation images ``(N, 3, H, W)`` in [0, 1] conditioned on held-out conditions (see
        :meth:`validation_conditions`)."""
        return self.model.sample(prompts, self.validation_conditions(prompts),
                                 num_inference_steps=vcfg.num_inference_steps, guidance_scale=vcfg.guidance_scale,
                                 generator=generators, batch_size=len(prompts))

    # -- loss -------------------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> LossOutput:
        """L_diff (+ λ(s)·reward term (+ regulariser)) on one micro-batch (ctrl_u.md §2)."""
        from genalign.pipelines.base import repeat_cond

        m, c = self.model, self.config
        z0, cond, target = batch["latents"], batch["cond"], batch["target"]
        B = z0.shape[0]
        step = self.step
        self._calls += 1
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


@_OBJECTIVES.register("controlnet_sft", "ControlNet baseline: diffusion loss only (no reward term)")
class ControlNetSFT(_ControlNetObjective):
    """Plain ControlNet training on (image, condition, caption): L = mse(ε̂, ε) over the batch. The baseline
    "trained without the reward term" of the Ctrl-U comparison (the condition reward only makes conditions
    and validation inputs)."""

    Config = ControlNetParams


@_OBJECTIVES.register("controlnet_pp", "ControlNet++: diffusion loss + λ·reward consistency (unweighted)")
class ControlNetPP(_ControlNetObjective):
    """ControlNet++ (Li et al., ECCV 2024): L = L_diff + λ(s)·L_reward on B rows, L_reward from
    :func:`controlnet_pp_reward_loss` (gated, unweighted). Source: ``liming-ai/ControlNet_Plus_Plus@9ffe264``
    ``train/reward_control.py`` L1504–1521. The λ ramp defaults to Ctrl-U's (5000 steps) so the two differ
    only by the uncertainty; set ``lambda_ramp_steps: null`` for ControlNet++'s constant λ."""

    Config = ControlNetPPParams
    use_reward = True


@_OBJECTIVES.register("ctrl_u", "Ctrl-U: uncertainty-weighted reward consistency for ControlNet (ICLR 2025)")
class CtrlU(_ControlNetObjective):
    """Ctrl-U (Zhang et al., ICLR 2025): 2B rows at [t; min(t+δ, 999)] with shared noise; L = L_diff (all 2B
    rows) + λ(s)·mean_p[l·exp(−U)] + reg·mean_p U on the primary rows (:func:`ctrl_u_reward_terms`). Source:
    ``grenoble-zhang/Ctrl-U@704d51d`` ``train/ctrlu-reward.py`` / ``ctrlu-depth.py`` / ``ctrlu-hed.py``."""

    Config = CtrlUParams
    use_reward = True
    paired = True
