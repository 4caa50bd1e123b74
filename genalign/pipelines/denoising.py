"""Denoising losses shared by every diffusion objective: noise → x_t → target → per-sample error.

One draw of noise ε and timestep t per sample (per *pair* for preference objectives, repeated for chosen and
rejected), one policy forward over all rows, and — when the objective has a reference model — one reference
forward on exactly the same inputs. The reference pass runs **first**, under ``no_grad`` with the adapters off,
so its activations are freed before the policy graph is built: peak memory is the policy's alone (a
Diffusion-DPO step costs what a MaPO step costs) and the losses and gradients are bitwise those of the
policy-first order (issue "DPO at MaPO's memory").

Works for any latent rank: images ``(B, C, h, w)``, audio ``(B, C, T)``.

Source: methods README §1-§2 (shared noise within a pair), MaPO ``train.py`` L377–436, Diffusion-DPO
``train.py`` L1053–1055, DDO Eq. 14-16 (shared (t, ε) for policy and reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from genalign.pipelines.base import repeat_cond


def per_sample_error(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean",
                     weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample squared error ‖pred − target‖² in fp32: ``(N, ...)`` → ``(N,)``.

    Both inputs are upcast *before* subtracting (methods README §5).

    Args:
        pred, target: tensors of one shape with a batch dimension.
        reduction: "mean" (official Diffusion-DPO / MaPO recipes) or "sum" (DDO's ELBO scale) over non-batch dims.
        weight: optional ``(N,)`` w(t) multiplying each sample's error.

    Raises:
        ValueError: shape mismatch, no batch dimension, unknown reduction, or a weight of the wrong shape.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.ndim < 1:
        raise ValueError("pred must have a batch dimension")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    err = (pred.float() - target.float()).pow(2).flatten(1)
    err = err.mean(dim=1) if reduction == "mean" else err.sum(dim=1)
    if weight is not None:
        if weight.shape != err.shape:
            raise ValueError(f"weight must have shape {tuple(err.shape)}, got {tuple(weight.shape)}")
        err = err * weight.float()
    return err


def draw_noise(x0: torch.Tensor, num_train_timesteps: int, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One noise tensor shaped like ``x0`` ``(B, ...)`` and one timestep ``(B,)`` ~ U{0..T−1} per row.

    Drawn on the CPU from ``generator`` (noise first, then timesteps) and moved to ``x0``'s device and dtype, so a
    run is reproducible across devices and a resumed run draws what the uninterrupted one drew.
    """
    noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device, x0.dtype)
    t = torch.randint(0, num_train_timesteps, (x0.shape[0],), generator=generator, device="cpu").to(x0.device)
    return noise, t


@dataclass
class DenoisingLosses:
    """Per-sample denoising losses at one (t, ε) draw, and the inputs both networks saw.

    Attributes:
        losses: ``(N,)`` fp32 policy losses (carry the graph).
        ref_losses: ``(N,)`` fp32 reference losses (no graph), or None without a reference pass.
        x_t, target: ``(N, ...)``; timesteps: ``(N,)`` long; noise: ``(N, ...)`` ε; cond: N rows.
    """

    losses: torch.Tensor
    ref_losses: torch.Tensor | None
    x_t: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    target: torch.Tensor
    cond: dict[str, Any]


def denoising_losses(model, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: dict[str, Any],
                     reduction: str = "mean", with_reference: bool = False,
                     weight: torch.Tensor | None = None) -> DenoisingLosses:
    """Policy (and optionally reference) per-sample losses at given ``noise`` and ``t``.

    Args:
        model: the adapter (``add_noise``, ``target``, ``predict``, ``reference``).
        x0: ``(N, ...)`` clean latents; noise: like x0; t: ``(N,)`` integer timesteps; cond: N rows.
        reduction: "mean" or "sum" over non-batch elements (:func:`per_sample_error`).
        with_reference: also run the reference network (first, under ``no_grad``) on the same inputs.
        weight: optional ``(N,)`` w(t) applied to both networks' errors.

    Raises:
        RuntimeError: ``with_reference`` while the pipeline has no reference (``pipeline.reference: none``).
    """
    x_t = model.add_noise(x0, noise, t)
    target = model.target(x0, noise, t)
    ref_losses = None
    if with_reference:
        with model.reference() as ref:  # before the policy forward: its activations are gone when the graph grows
            ref_losses = per_sample_error(model.predict(x_t, t, cond, unet=ref), target, reduction, weight).detach()
    losses = per_sample_error(model.predict(x_t, t, cond), target, reduction, weight)
    return DenoisingLosses(losses, ref_losses, x_t, t, noise, target, cond)


def shared_noise_losses(model, x0: torch.Tensor, cond: dict[str, Any], generator: torch.Generator | None = None,
                        reduction: str = "mean", weight: torch.Tensor | None = None) -> DenoisingLosses:
    """Unpaired samples: (t, ε) drawn once per sample and shared by policy and reference (DDO, Diffusion-KTO).

    Returns :class:`DenoisingLosses` with ``losses`` and ``ref_losses`` of shape ``(N,)``.
    """
    noise, t = draw_noise(x0, model.num_train_timesteps, generator)
    return denoising_losses(model, x0, noise, t, cond, reduction, with_reference=True, weight=weight)


@dataclass
class PairedLosses:
    """:func:`paired_denoising_losses` output: ``(B,)`` losses of chosen (w) and rejected (l), policy and reference.

    ``ref_w`` / ``ref_l`` are None without a reference pass; ``x_t``, ``timesteps``, ``target``, ``cond`` hold the
    2B rows ``[w; l]`` both networks saw.
    """

    losses_w: torch.Tensor
    losses_l: torch.Tensor
    ref_w: torch.Tensor | None
    ref_l: torch.Tensor | None
    x_t: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    cond: dict[str, Any]


def paired_denoising_losses(model, latents_w: torch.Tensor, latents_l: torch.Tensor, cond: dict[str, Any],
                            generator: torch.Generator | None = None, reduction: str = "mean",
                            with_reference: bool = False) -> PairedLosses:
    """Per-sample denoising losses of B preference pairs with one (t, ε) per pair, shared by chosen and rejected.

    Rows are ``[chosen; rejected]`` (2B): one policy forward, reduced once, then split; with ``with_reference`` the
    reference network sees exactly the same inputs (and runs first, see the module docstring).

    Args:
        model: the adapter. latents_w, latents_l: scaled latents ``(B, ...)`` of the chosen / rejected samples.
        cond: conditioning for B rows (repeated ×2 so both members see identical conditioning).
        generator: CPU generator for noise and timesteps (seeded by the trainer per micro-step).
        reduction: "mean" (official recipes) or "sum" over non-batch elements.

    Raises:
        ValueError: chosen and rejected latents differ in shape.

    Source: MaPO ``train.py`` L377–436; Diffusion-DPO ``train.py`` L1053–1055 (methods README §1-§2).
    """
    if latents_w.shape != latents_l.shape:
        raise ValueError(f"winner/loser latents differ in shape: {tuple(latents_w.shape)} vs {tuple(latents_l.shape)}")
    noise, t = draw_noise(latents_w, model.num_train_timesteps, generator)
    reps = (2,) + (1,) * (latents_w.ndim - 1)
    out = denoising_losses(model, torch.cat([latents_w, latents_l]), noise.repeat(*reps), t.repeat(2),
                           repeat_cond(cond, 2), reduction, with_reference)
    losses_w, losses_l = out.losses.chunk(2)
    ref_w, ref_l = out.ref_losses.chunk(2) if out.ref_losses is not None else (None, None)
    return PairedLosses(losses_w, losses_l, ref_w, ref_l, out.x_t, out.timesteps, out.target, out.cond)


def reference_losses(model, fwd: PairedLosses, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Reference ``(B,)``, ``(B,)`` losses on exactly the inputs of an earlier policy pass, without gradient.

    Prefer ``paired_denoising_losses(..., with_reference=True)``, which runs the reference first (lower peak memory);
    this form exists for checks that compare networks on recorded inputs.
    """
    with model.reference() as ref_unet:
        losses = per_sample_error(model.predict(fwd.x_t, fwd.timesteps, fwd.cond, unet=ref_unet), fwd.target, reduction)
    return tuple(losses.detach().chunk(2))  # type: ignore[return-value]


def convert_beta(beta: float, from_reduction: str, to_reduction: str, num_elements: int) -> float:
    """Convert a logit scale β between mean- and sum-reduced per-sample errors (README §3).

    Used to log a method's β in the other convention at start-up (DDO, DRAGON) and to compare recipes.

    κ·(difference of means) = (κ/D)·(difference of sums), so β_sum = β_mean / D and β_mean = D·β_sum.

    Args:
        beta: β > 0 in the ``from_reduction`` convention.
        from_reduction, to_reduction: "mean" or "sum".
        num_elements: D = number of elements per sample (C·H·W), e.g. 16,384 for SD1.5-512 latents.

    Returns:
        β in the ``to_reduction`` convention (e.g. DDO β_sum = 0.05 ↔ β_mean = 819.2 at D = 16,384).

    Raises:
        ValueError: unknown reduction, β ≤ 0 or D < 1.
    """
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if int(num_elements) != num_elements or num_elements < 1:
        raise ValueError(f"num_elements must be a positive integer, got {num_elements!r}")
    for r in (from_reduction, to_reduction):
        if r not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {r!r}")
    if from_reduction == to_reduction:
        return float(beta)
    if from_reduction == "sum":
        return float(beta) * num_elements
    return float(beta) / num_elements
