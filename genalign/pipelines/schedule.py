"""Closed-form conversions between a diffusion model's prediction and x0 / ε / v (DDPM-family schedules).

Small pure functions in the k-diffusion style. With ᾱ_t the cumulative product of the noise schedule,
a = sqrt(ᾱ_t) and s = sqrt(1 − ᾱ_t), the forward process is x_t = a·x0 + s·ε and the v-target is
v = a·ε − s·x0 (Salimans & Ho 2022, §4; Diffusers ``DDPMScheduler.get_velocity``). Everything is computed in
fp32 (inputs upcast first) and keeps the autograd graph; nothing is clipped.

Shapes: ``x_t`` and predictions ``(B, ...)`` (images ``(B, C, h, w)``, audio ``(B, C, T)``); ``alpha_bar`` a
``(B,)`` tensor of ᾱ_t values in (0, 1] (take ``alphas_cumprod[t]``) or a Python float for one shared t.
"""

from __future__ import annotations

import torch


def bcast(values: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A per-sample ``(B,)`` tensor (or a scalar) viewed as ``(B, 1, ..., 1)`` in fp32 on ``like``'s device."""
    v = torch.as_tensor(values, dtype=torch.float32, device=like.device)
    return v.view((-1,) + (1,) * (like.ndim - 1)) if v.ndim else v


def alpha_bar_at(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor | int) -> torch.Tensor:
    """ᾱ_t for integer ``timesteps`` (``(B,)`` or an int) from a ``(T,)`` schedule, fp32.

    Raises:
        ValueError: a timestep outside ``[0, T − 1]``.
    """
    t = torch.as_tensor(timesteps).long().to(alphas_cumprod.device)
    if (t < 0).any() or (t >= alphas_cumprod.shape[0]).any():
        raise ValueError(f"timesteps must lie in [0, {alphas_cumprod.shape[0] - 1}], got {t.tolist()}")
    return alphas_cumprod.to(torch.float32)[t]


def _check(x_t: torch.Tensor, pred: torch.Tensor) -> None:
    if x_t.shape != pred.shape:
        raise ValueError(f"x_t and the prediction differ in shape: {tuple(x_t.shape)} vs {tuple(pred.shape)}")


def x0_from_epsilon(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """x̂0 = (x_t − sqrt(1 − ᾱ)·ε̂) / sqrt(ᾱ) — ``DDPMScheduler.step(...).pred_original_sample`` without clipping.

    Raises:
        ValueError: ``x_t`` and ``eps`` differ in shape.
    """
    _check(x_t, eps)
    ab = bcast(alpha_bar, x_t)
    return (x_t.float() - (1 - ab).sqrt() * eps.float()) / ab.sqrt()


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """x̂0 = sqrt(ᾱ)·x_t − sqrt(1 − ᾱ)·v̂ (v-prediction).

    Also the cosine v-objective of Stable Audio Open with ᾱ = cos²(πt/2), t ∈ [0, 1].

    Raises:
        ValueError: ``x_t`` and ``v`` differ in shape.
    """
    _check(x_t, v)
    ab = bcast(alpha_bar, x_t)
    return ab.sqrt() * x_t.float() - (1 - ab).sqrt() * v.float()


def epsilon_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """ε̂ = sqrt(1 − ᾱ)·x_t + sqrt(ᾱ)·v̂ (v-prediction).

    Raises:
        ValueError: ``x_t`` and ``v`` differ in shape.
    """
    _check(x_t, v)
    ab = bcast(alpha_bar, x_t)
    return (1 - ab).sqrt() * x_t.float() + ab.sqrt() * v.float()


def epsilon_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """ε̂ = (x_t − sqrt(ᾱ)·x̂0) / sqrt(1 − ᾱ); undefined at ᾱ = 1 (t = 0 of a zero-terminal-SNR-free schedule).

    Raises:
        ValueError: ``x_t`` and ``x0`` differ in shape.
    """
    _check(x_t, x0)
    ab = bcast(alpha_bar, x_t)
    return (x_t.float() - ab.sqrt() * x0.float()) / (1 - ab).sqrt()


def x0_from_prediction(pred: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor | float,
                       prediction_type: str) -> torch.Tensor:
    """x̂0 from a network output of the given ``prediction_type`` ("epsilon", "v_prediction" or "sample").

    Raises:
        ValueError: an unknown prediction type, or shapes that differ.
    """
    if prediction_type == "epsilon":
        return x0_from_epsilon(x_t, pred, alpha_bar)
    if prediction_type == "v_prediction":
        return x0_from_v(x_t, pred, alpha_bar)
    if prediction_type == "sample":
        _check(x_t, pred)
        return pred.float()
    raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon, v_prediction or sample)")


def x0_and_epsilon(pred: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor | float,
                   prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂0, ε̂) from a network output, as DDIM's update needs both (Song et al. 2021, Eq. 12).

    Raises:
        ValueError: a prediction type other than "epsilon" / "v_prediction", or shapes that differ.
    """
    if prediction_type == "epsilon":
        return x0_from_epsilon(x_t, pred, alpha_bar), pred.float()
    if prediction_type == "v_prediction":
        return x0_from_v(x_t, pred, alpha_bar), epsilon_from_v(x_t, pred, alpha_bar)
    raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon or v_prediction)")
