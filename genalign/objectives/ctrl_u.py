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


def _per_pixel_loss(pred: torch.Tensor, target: torch.Tensor, task: str, ignore_index: int) -> torch.Tensor:
    """l(p), (B, H, W): CE (seg, 0 at ignored pixels), squared error (depth), channel-mean squared error (edges)."""
    if task == "segmentation":
        return F.cross_entropy(pred, target.long(), ignore_index=ignore_index, reduction="none")
    if task == "depth":
        return (pred - target.to(torch.float32)) ** 2
    return ((pred - target.to(torch.float32)) ** 2).mean(dim=1)


def _per_image_reward(
    l: torch.Tensor, target: torch.Tensor, task: str, ignore_index: int, weight: Optional[torch.Tensor] = None
) -> torch.Tensor:
    if weight is not None:
        l = l * weight
    if task == "segmentation":
        valid = (target != ignore_index).to(torch.float32)
        return (valid * l).sum(dim=(-1, -2)) / (valid.sum(dim=(-1, -2)) + _GATE_EPS)
    return l.mean(dim=(-1, -2))


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


def normalize_depth_by_max(depth: torch.Tensor) -> torch.Tensor:
    """Divide each (H, W) depth map of a (B, H, W) tensor by its per-image max ([code] depth reward preprocessing)."""
    if depth.ndim != 3:
        raise ValueError(f"depth must be (B, H, W), got {tuple(depth.shape)}")
    d = depth.to(torch.float32)
    return d / d.flatten(1).amax(dim=1).view(-1, 1, 1)
