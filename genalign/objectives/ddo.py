"""DDO — Direct Discriminative Optimization (Zheng et al., ICML 2025, arXiv 2503.01103).

DDO fine-tunes a likelihood-based generator with a GAN discriminator objective whose discriminator is the
*implicit* likelihood ratio d_θ(x) = σ(β·r_θ(x)), r_θ(x) = log p_θ(x) − log p_ref(x), between the trained model
and its frozen starting point. Real data should receive a high ratio and reference samples a low one
(paper Eq. 13)::

    L(θ) = − E_{x~p_data} logσ(β r_θ(x))  −  α · E_{x~p_ref} logσ(−β r_θ(x))

For diffusion models r_θ is replaced by the one-sample estimate (Eq. 14–16, Jensen upper bound)
Δ(x) = −w(t)·(‖ε_θ(x_t,t) − ε‖² − ‖ε_ref(x_t,t) − ε‖²) with (t, ε) shared by both networks; for autoregressive
models r_θ is the difference of summed token log-probs (Eq. 1). Verified: the form of Eq. 13 and the sign of Δ
([paper], cross-checked against the third-party port ``Tyrion58/T3D`` ``train/self_ddo_sdar_full.py``).
Reconstructed / recommended (config options): the per-sample *sum* reduction of the errors ([recon], the only
scale at which β ∈ [0.01, 0.1] makes sense), α = 4 and β = 0.05 ([unknown → rec.], centre of the paper's grids),
the weighting w(t) (the model's own training weighting, [recon]) and the 1 : 1 real : fake ratio
([unknown → rec.]). There is no official training code.

β convention: ``beta`` multiplies differences of per-sample errors. With ``reduction="sum"`` (genalign default for
DDO) the errors are summed over all D = C·H·W elements; with ``reduction="mean"`` they are averaged, and the
equivalent temperature is β_mean = D·β_sum (see :func:`convert_beta`, README §3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "DDOConfig",
    "ddo_loss",
    "ddo_loss_from_log_ratios",
    "per_sample_error",
    "convert_beta",
    "edm_preconditioning",
    "edm_f_target",
]


@dataclass
class DDOConfig:
    """Hyperparameters of DDO with their provenance tags (see /work/shared/methods/ddo.md §3)."""

    alpha: float = 4.0  # [unknown → rec.] centre of the paper's diffusion grid α ∈ [0.5, 6] at β = 0.05
    beta: float = 0.05  # [unknown → rec.] centre of β ∈ [0.01, 0.1] (paper footnote 3); stored WITH `reduction`
    reduction: str = "sum"  # [recon] per-sample errors summed over all elements (ELBO scale); "mean" ⇒ β·D
    weighting: str = "model"  # [recon] w(t): the weighting the model was trained with (EDM λ(σ); DDPM "simple")
    real_fake_ratio: float = 1.0  # [unknown → rec.] real : fake batch-size ratio
    noise_level_sampling: str = "model"  # [unknown → rec.] the model's own training t / σ distribution
    fake_sampler: str = "pipeline_default"  # [unknown → rec.] model's standard sampler, CFG off for fakes
    learning_rate: float = 1e-5  # [unknown → rec.] ≤ 0.1× pretraining lr (AdamW 1e-5 for latent diffusion)
    batch_size_per_term: int = 64  # [unknown → rec.] ≥ 64 real and ≥ 64 fake samples per step
    mixed_precision: bool = False  # [2nd] authors disable mixed precision for diffusion DDO
    dropout: bool = False  # [2nd] dropout off in both networks
    keep_label_dropout: bool = True  # [2nd] keep pretraining caption/label dropout (CFG compatibility)
    ar_beta: float = 0.02  # [paper] VAR setting (Fig. 6c caption)
    ar_alpha: float = 10.0  # [2nd] VAR grid α ∈ [10, 100]


def _check_1d(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor of per-sample values, got shape {tuple(x.shape)}")


def _check_positive(name: str, v: float) -> None:
    if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")


def _weighted_mean(values: torch.Tensor, weights: Optional[torch.Tensor], name: str) -> torch.Tensor:
    if weights is None:
        return values.mean()
    weights = weights.to(torch.float32)
    if weights.shape != values.shape:
        raise ValueError(f"{name} must have shape {tuple(values.shape)}, got {tuple(weights.shape)}")
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"{name} must be non-negative with a positive sum")
    return (weights * values).sum() / weights.sum()


def ddo_loss_from_log_ratios(
    log_ratio_real: torch.Tensor,
    log_ratio_fake: torch.Tensor,
    alpha: float = 4.0,
    beta: float = 0.05,
    *,
    weights_real: Optional[torch.Tensor] = None,
    weights_fake: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, dict]:
    """DDO loss (paper Eq. 13) from per-sample log-likelihood-ratio estimates.

    Args:
        log_ratio_real: (B_real,) estimates of r_θ(x) = log p_θ(x) − log p_ref(x) on real data (nats; for
            diffusion Δ = −(L_θ − L_ref)). Must carry the graph of the trained model.
        log_ratio_fake: (B_fake,) the same on samples from p_ref. B_fake may differ from B_real.
        alpha: weight α > 0 of the fake term.
        beta: scale β > 0 of the log-ratio inside the sigmoid (convention: see module docstring).
        weights_real / weights_fake: optional non-negative (B,) weights; each expectation becomes
            Σ w·f / Σ w instead of the plain batch mean (used e.g. for exact expectations on a finite space).

    Returns:
        ``(loss, metrics)``: scalar fp32 loss
        ``mean_real[−logσ(βr)] + α·mean_fake[−logσ(−βr)]`` and a dict of detached scalars ``loss_real``,
        ``loss_fake`` (unweighted by α), ``loss_fake_weighted``, ``d_real`` = mean σ(βr_real),
        ``d_fake`` = mean σ(βr_fake), ``log_ratio_real``, ``log_ratio_fake`` (means), ``disc_acc``.

    Raises:
        ValueError: non-1-D or empty inputs, α ≤ 0 or β ≤ 0, bad weights.

    Source: Zheng et al. 2025, §3.3 Eq. 13; log(1 − σ(z)) computed as logσ(−z) (stable for |z| ≫ 1).
    """
    _check_1d("log_ratio_real", log_ratio_real)
    _check_1d("log_ratio_fake", log_ratio_fake)
    _check_positive("alpha", alpha)
    _check_positive("beta", beta)
    z_real = beta * log_ratio_real.to(torch.float32)
    z_fake = beta * log_ratio_fake.to(torch.float32)
    loss_real = _weighted_mean(-F.logsigmoid(z_real), weights_real, "weights_real")
    loss_fake = _weighted_mean(-F.logsigmoid(-z_fake), weights_fake, "weights_fake")
    loss = loss_real + alpha * loss_fake
    with torch.no_grad():
        d_real = torch.sigmoid(z_real).mean()
        d_fake = torch.sigmoid(z_fake).mean()
        metrics = {
            "loss": loss.detach(),
            "loss_real": loss_real.detach(),
            "loss_fake": loss_fake.detach(),
            "loss_fake_weighted": (alpha * loss_fake).detach(),
            "d_real": d_real,
            "d_fake": d_fake,
            "log_ratio_real": log_ratio_real.detach().float().mean(),
            "log_ratio_fake": log_ratio_fake.detach().float().mean(),
            # fraction of samples the implicit discriminator classifies correctly (d > ½ on real, < ½ on fake)
            "disc_acc": 0.5 * ((z_real > 0).float().mean() + (z_fake < 0).float().mean()),
        }
    return loss, metrics


def ddo_loss(
    target_losses_real: torch.Tensor,
    ref_losses_real: torch.Tensor,
    target_losses_fake: torch.Tensor,
    ref_losses_fake: torch.Tensor,
    alpha: float = 4.0,
    beta: float = 0.05,
) -> Tuple[torch.Tensor, dict]:
    """DDO loss for diffusion models from per-sample (weighted) denoising errors (paper Eq. 13–16).

    Δ = −(L_θ − L_ref) is the one-sample estimate of log p_θ − log p_ref; then Eq. 13 (see
    :func:`ddo_loss_from_log_ratios`). The reference errors are stop-gradient (detached here as well).

    Args:
        target_losses_real: (B_real,) per-sample w(t)-weighted denoising errors of the trained model on real data,
            e.g. :func:`per_sample_error` of (ε_θ(x_t, t), ε). Default convention: **sum** over all D elements
            ([recon]); with per-element means use β_mean = D·β_sum (:func:`convert_beta`).
        ref_losses_real: (B_real,) the reference model's errors at the *same* (x_t, t, ε, conditioning).
        target_losses_fake: (B_fake,) trained-model errors on reference samples.
        ref_losses_fake: (B_fake,) reference errors on the same noisy reference samples.
        alpha: fake-term weight, default 4 ([unknown → rec.]).
        beta: log-ratio scale, default 0.05 for sum-reduced errors ([unknown → rec.]).

    Returns:
        ``(loss, metrics)`` as in :func:`ddo_loss_from_log_ratios`, plus ``raw_model_loss_real``,
        ``raw_ref_loss_real``, ``raw_model_loss_fake``, ``raw_ref_loss_fake`` (batch means).

    Raises:
        ValueError: shapes are not 1-D, real (or fake) target/ref shapes differ, α ≤ 0, β ≤ 0.

    Source: Zheng et al. 2025 Eq. 13 (loss), Eq. 15 (Δ), Eq. 16 (Jensen); card ddo.md §2.2. Pitfall 6: Δ is
    *minus* (L_θ − L_ref) so real data ends with d_real → 1 and fakes with d_fake → 0.
    """
    for name, x in (
        ("target_losses_real", target_losses_real),
        ("ref_losses_real", ref_losses_real),
        ("target_losses_fake", target_losses_fake),
        ("ref_losses_fake", ref_losses_fake),
    ):
        _check_1d(name, x)
    if target_losses_real.shape != ref_losses_real.shape:
        raise ValueError(
            f"real target/ref losses differ in shape: {tuple(target_losses_real.shape)} vs "
            f"{tuple(ref_losses_real.shape)}"
        )
    if target_losses_fake.shape != ref_losses_fake.shape:
        raise ValueError(
            f"fake target/ref losses differ in shape: {tuple(target_losses_fake.shape)} vs "
            f"{tuple(ref_losses_fake.shape)}"
        )
    lt_r = target_losses_real.to(torch.float32)
    lr_r = ref_losses_real.detach().to(torch.float32)
    lt_f = target_losses_fake.to(torch.float32)
    lr_f = ref_losses_fake.detach().to(torch.float32)
    delta_real = -(lt_r - lr_r)
    delta_fake = -(lt_f - lr_f)
    loss, metrics = ddo_loss_from_log_ratios(delta_real, delta_fake, alpha=alpha, beta=beta)
    metrics.update(
        raw_model_loss_real=lt_r.detach().mean(),
        raw_ref_loss_real=lr_r.mean(),
        raw_model_loss_fake=lt_f.detach().mean(),
        raw_ref_loss_fake=lr_f.mean(),
    )
    return loss, metrics


def per_sample_error(
    pred: torch.Tensor,
    target: torch.Tensor,
    reduction: str = "sum",
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-sample squared error ‖pred − target‖², reduced over every non-batch dim, in fp32.

    Args:
        pred, target: (B, ...) tensors of the same shape (upcast to fp32 before subtracting).
        reduction: "sum" (DDO default, [recon]) or "mean" over the D non-batch elements.
        weight: optional (B,) w(t) multiplying each sample's error.

    Returns:
        (B,) fp32 tensor.

    Raises:
        ValueError: shape mismatch, pred with < 1 dim, unknown reduction, bad weight shape.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.ndim < 1:
        raise ValueError("pred must have a batch dimension")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    sq = (pred.to(torch.float32) - target.to(torch.float32)) ** 2
    dims = tuple(range(1, sq.ndim))
    err = sq.sum(dim=dims) if reduction == "sum" else sq.mean(dim=dims)
    if weight is not None:
        if weight.shape != err.shape:
            raise ValueError(f"weight must have shape {tuple(err.shape)}, got {tuple(weight.shape)}")
        err = err * weight.to(torch.float32)
    return err


def convert_beta(beta: float, from_reduction: str, to_reduction: str, num_elements: int) -> float:
    """Convert a logit scale β between mean- and sum-reduced per-sample errors (README §3).

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
    _check_positive("beta", beta)
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


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float = 0.5) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    """EDM effective training target F̂ = (x0 − c_skip·x_t)/c_out (DDO App. C form, [2nd]).

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
