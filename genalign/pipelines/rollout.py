"""Samplers of few-step generators: forward noising, generalised DDIM(η) steps with a per-sample η, and the
random-η rectified-flow step and rollout (R0 / Reward-Instruct, DI*; r0.md §2.1, di_star.md §2.2).

Pure functions on tensors, fp32 (inputs upcast first), graph kept; per-sample quantities are scalars or ``(B,)``
tensors broadcast over the non-batch dims (:func:`genalign.pipelines.schedule.bcast`). VP convention:
x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε; rectified flow: x_t = (1 − t)·x0 + t·ε, v = ε − x0, t ∈ [0, 1].

Source: Song et al. 2021 (DDIM, Eq. 12, σ_η of Eq. 16) and Diffusers ``DDIMScheduler.step``; rectified flow as in
SD3 / Diffusers ``FlowMatchEulerDiscreteScheduler``; the random-η re-noising is R0's [recon] (r0.md §2.1).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from genalign.pipelines.schedule import bcast

__all__ = ["noisy_sample", "ddim_random_eta_step", "flow_predictions_from_velocity", "flow_random_eta_step",
           "flow_rollout"]

PerSample = Union[float, torch.Tensor]


def _per_sample(x: PerSample, like: torch.Tensor) -> torch.Tensor:
    """A scalar or ``(B,)`` value as ``(B, 1, ..., 1)`` fp32; raises ValueError on another shape."""
    v = torch.as_tensor(x, dtype=torch.float32, device=like.device)
    if v.ndim == 0:
        v = v.expand(like.shape[0])
    if v.shape != (like.shape[0],):
        raise ValueError(f"per-sample value must be a scalar or ({like.shape[0]},), got {tuple(v.shape)}")
    return bcast(v, like)


def noisy_sample(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: PerSample) -> torch.Tensor:
    """VP forward noising x_t = sqrt(ᾱ)·x0 + sqrt(1 − ᾱ)·ε in fp32, keeping x0's graph.

    Args: x0, noise ``(B, ...)``; alpha_bar scalar or ``(B,)`` ᾱ_t in (0, 1] (``schedule.alpha_bar_at``).
    Raises ValueError when x0 and noise differ in shape.
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ")
    ab = _per_sample(alpha_bar, x0)
    return ab.sqrt() * x0.to(torch.float32) + (1 - ab).sqrt() * noise.to(torch.float32)


def ddim_random_eta_step(
    x0_hat: torch.Tensor,
    eps_hat: torch.Tensor,
    alpha_bar_t: PerSample,
    alpha_bar_next: PerSample,
    eta: PerSample,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Generalised DDIM(η) step for VP/ε backbones with a per-sample η.

    σ_η = η·sqrt((1 − ᾱ')/(1 − ᾱ))·sqrt(1 − ᾱ/ᾱ'), x' = sqrt(ᾱ')·x̂0 + sqrt(1 − ᾱ' − σ_η²)·ε̂ + σ_η·ξ.
    η = 0 equals ``DDIMScheduler.step(eta=0)``; η = 1 is DDPM's ancestral variance.

    Args:
        x0_hat, eps_hat: ``(B, ...)`` predictions at the current step. alpha_bar_t, alpha_bar_next: ᾱ of the
            current and next timesteps, scalars or ``(B,)``. eta: scalar or ``(B,)`` in [0, 1].
        noise: ξ ``(B, ...)``, required when any σ_η > 0.

    Raises:
        ValueError: shape mismatches, η outside [0, 1], or missing noise.

    Source: Song et al. 2021, Eq. 12 / 16; r0.md §2.1 (per-sample random η, [recon]).
    """
    if x0_hat.shape != eps_hat.shape:
        raise ValueError(f"x0_hat {tuple(x0_hat.shape)} and eps_hat {tuple(eps_hat.shape)} differ")
    ab = _per_sample(alpha_bar_t, x0_hat)
    abn = _per_sample(alpha_bar_next, x0_hat)
    e = _per_sample(eta, x0_hat)
    if ((e < 0) | (e > 1)).any():
        raise ValueError("eta must lie in [0, 1]")
    sigma = e * torch.sqrt((1 - abn) / (1 - ab)) * torch.sqrt((1 - ab / abn).clamp_min(0))
    out = torch.sqrt(abn) * x0_hat.to(torch.float32) + torch.sqrt((1 - abn - sigma**2).clamp_min(0)) * eps_hat.to(
        torch.float32
    )
    if bool((sigma > 0).any()):
        if noise is None or noise.shape != x0_hat.shape:
            raise ValueError("noise of x0_hat's shape is required when eta > 0")
        out = out + sigma * noise.to(torch.float32)
    return out


def flow_predictions_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: PerSample) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rectified flow x_t = (1 − t)x0 + tε, v = ε − x0 ⇒ (x̂0, ε̂) = (x_t − t·v̂, x_t + (1 − t)·v̂), fp32.

    ``x_t``, ``v``: (B, ...); ``t``: scalar or (B,) in [0, 1] (SD3 passes t·1000 to the transformer; here t ∈ [0, 1]).
    Raises ValueError on a shape mismatch.
    """
    if x_t.shape != v.shape:
        raise ValueError(f"x_t {tuple(x_t.shape)} and v {tuple(v.shape)} differ")
    tt = _per_sample(t, x_t)
    x, vv = x_t.to(torch.float32), v.to(torch.float32)
    return x - tt * vv, x + (1 - tt) * vv


def flow_random_eta_step(
    x0_hat: torch.Tensor,
    eps_hat: torch.Tensor,
    t_next: PerSample,
    eta: PerSample,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Random-η flow step x_{t'} = (1 − t')·x̂0 + t'·(sqrt(1 − η²)·ε̂ + η·ξ) ([recon], r0.md §2.1).

    η = 0 is the deterministic Euler jump x_t + (t' − t)·v̂; η = 1 re-noises fully. If ε̂ were the true noise the
    marginal of x_{t'} given x0 is N((1 − t')x0, t'²I) for every η.

    Args: x0_hat, eps_hat (B, ...); t_next scalar or (B,) in [0, 1]; eta scalar or (B,) in [0, 1]; noise ξ
    (B, ...), required when any η > 0. Raises ValueError on bad shapes / ranges.
    """
    if x0_hat.shape != eps_hat.shape:
        raise ValueError(f"x0_hat {tuple(x0_hat.shape)} and eps_hat {tuple(eps_hat.shape)} differ")
    tn = _per_sample(t_next, x0_hat)
    e = _per_sample(eta, x0_hat)
    if ((e < 0) | (e > 1)).any() or ((tn < 0) | (tn > 1)).any():
        raise ValueError("eta and t_next must lie in [0, 1]")
    direction = torch.sqrt(1 - e**2) * eps_hat.to(torch.float32)
    if bool((e > 0).any()):
        if noise is None or noise.shape != x0_hat.shape:
            raise ValueError("noise of x0_hat's shape is required when eta > 0")
        direction = direction + e * noise.to(torch.float32)
    return (1 - tn) * x0_hat.to(torch.float32) + tn * direction


def flow_rollout(
    predict_fn: Callable[[torch.Tensor, float, int], Tuple[torch.Tensor, torch.Tensor]],
    z: torch.Tensor,
    times: Sequence[float],
    eta: PerSample = 0.0,
    generator: Optional[torch.Generator] = None,
    backprop_steps: Optional[int] = None,
) -> List[torch.Tensor]:
    """K-step random-η flow rollout from x_{t_0} = z; returns [x̂0^(0), …, x̂0^(K−1)] ([recon], r0.md §2.1).

    Args:
        predict_fn: ``(x_t, t, k) -> (x̂0, ε̂)`` the trainable network (e.g. via
            :func:`flow_predictions_from_velocity`), with graph.
        z: (B, ...) initial noise; times: K decreasing times t_0 > … > t_{K−1} in (0, 1].
        eta: scalar or (B,) η for the re-noising (training: random; inference 0).
        generator: CPU generator for the re-noising ξ.
        backprop_steps: None ⇒ full back-propagation; k ⇒ the state entering step K − k is detached, so only the
            last k network calls receive gradient.

    Raises ValueError on non-decreasing times or a bad backprop_steps.
    """
    K = len(times)
    if K == 0 or any(b >= a for a, b in zip(times, times[1:])):
        raise ValueError(f"times must be a non-empty strictly decreasing sequence, got {list(times)}")
    if backprop_steps is not None and not 1 <= backprop_steps <= K:
        raise ValueError(f"backprop_steps must be in [1, {K}] or None")
    x = z.to(torch.float32)
    outs = []
    for k, t in enumerate(times):
        if backprop_steps is not None and k == K - backprop_steps:
            x = x.detach()
        x0_hat, eps_hat = predict_fn(x, float(t), k)
        outs.append(x0_hat)
        if k < K - 1:
            noise = torch.randn(z.shape, generator=generator).to(z.device)
            x = flow_random_eta_step(x0_hat, eps_hat, float(times[k + 1]), eta, noise)
    return outs
