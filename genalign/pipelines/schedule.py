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


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM preconditioning (Karras et al. 2022): returns ``(c_skip, c_out, lambda)``.

    c_skip = σ_d²/(σ² + σ_d²), c_out = σσ_d/sqrt(σ² + σ_d²), λ(σ) = 1/c_out². ``sigma``: any shape, > 0.
    """
    sigma = sigma.to(torch.float32)
    if (sigma <= 0).any():
        raise ValueError("sigma must be > 0")
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)
    return c_skip, c_out, 1.0 / c_out**2


def edm_f_target(x0: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM effective training target F̂ = (x0 − c_skip·x_t)/c_out (Karras et al. 2022 Eq. 8; DDO App. C form).

    Args:
        x0, x_t: (B, ...) clean and noisy samples (x_t = x0 + σ·n).
        sigma: (B,) noise levels.

    With this target ‖F_θ − F̂‖² = λ(σ)·‖D_θ − x0‖² for D_θ = c_skip·x_t + c_out·F_θ, so the F-space error already
    carries EDM's loss weighting and needs no separate w(t).
    """
    if x0.shape != x_t.shape:
        raise ValueError(f"x0 and x_t shapes differ: {tuple(x0.shape)} vs {tuple(x_t.shape)}")
    if sigma.ndim != 1 or sigma.shape[0] != x0.shape[0]:
        raise ValueError(f"sigma must have shape ({x0.shape[0]},), got {tuple(sigma.shape)}")
    c_skip, c_out, _ = edm_preconditioning(sigma, sigma_data)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    return (x0.to(torch.float32) - c_skip.view(shape) * x_t.to(torch.float32)) / c_out.view(shape)
