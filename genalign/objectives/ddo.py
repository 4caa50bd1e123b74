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


# ==============================================================================================================
# Trainer integration: the `ddo` objective (real data vs the frozen reference's own samples, self-play rounds)
# ==============================================================================================================
#
# Shared helpers below are also used by DRAGON (genalign/objectives/dragon.py): seeded latent sampling with the
# policy or the reference, per-sample denoising losses of policy and reference at one shared (t, ε) draw per
# sample, conditioning concatenation, and the LoRA "merge into the base" used for self-play round switches.

import contextlib  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Literal  # noqa: E402

from pydantic import Field  # noqa: E402

from genalign.objectives.base import LossOutput, Objective, ObjectiveParams, TrainContext  # noqa: E402
from genalign.registry import objectives as _OBJECTIVES  # noqa: E402

logger = logging.getLogger(__name__)


def cat_cond(conds: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate conditioning dicts along dim 0 (tensors; nested dicts recursively; other values from the first)."""
    out: dict[str, Any] = {}
    for k, v in conds[0].items():
        if isinstance(v, torch.Tensor):
            out[k] = torch.cat([c[k] for c in conds])
        elif isinstance(v, dict):
            out[k] = cat_cond([c[k] for c in conds])
        else:
            out[k] = v
    return out


def _cond_rows(cond: dict[str, Any], idx) -> dict[str, Any]:
    from genalign.pipelines.base import index_cond

    return index_cond(cond, idx)


def _cond_where(mask: torch.Tensor, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Row-wise select: rows of ``a`` where ``mask`` (N,) is True, else rows of ``b`` (same shapes)."""
    out: dict[str, Any] = {}
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            m = mask.to(v.device).view((-1,) + (1,) * (v.ndim - 1))
            out[k] = torch.where(m, v, b[k].to(v.device, v.dtype))
        elif isinstance(v, dict):
            out[k] = _cond_where(mask, v, b[k])
        else:
            out[k] = v
    return out


def encode_prompts(model, prompts: list[str], batch_size: int = 64) -> dict[str, Any]:
    """``model.encode_prompt`` in chunks, every tensor moved to CPU: a cond dict with ``len(prompts)`` rows."""
    from genalign.pipelines.base import cond_to

    parts = [cond_to(model.encode_prompt(prompts[i:i + batch_size]), "cpu") for i in range(0, len(prompts), batch_size)]
    return cat_cond(parts)


def _denoiser_name(model) -> str:
    return getattr(model, "pipe_denoiser", "unet")


@contextlib.contextmanager
def sampling_network(model, use_reference: bool = False):
    """Context in which ``model.pipe`` samples with the policy (eval mode) or the reference (no grad).

    With ``reference: adapter_off`` the pipeline's own network has its LoRA disabled; with ``frozen_copy`` the
    pipeline's network is temporarily swapped for the frozen copy. Training mode is restored on exit.
    """
    raw = getattr(model, "_raw_unet", model.unet)
    was_training = raw.training
    raw.eval()
    try:
        if not use_reference:
            with torch.no_grad():
                yield raw
            return
        with model.reference() as ref:
            name = _denoiser_name(model)
            old = getattr(model.pipe, name)
            setattr(model.pipe, name, ref)
            try:
                yield ref
            finally:
                setattr(model.pipe, name, old)
    finally:
        raw.train(was_training)


@torch.no_grad()
def sample_latents(model, prompts: list[str], generators: list[torch.Generator], num_inference_steps: int = 25,
                   guidance_scale: float = 1.0, use_reference: bool = False, batch_size: int = 32) -> torch.Tensor:
    """Seeded samples in the model's *training latent space* (the x0 the denoiser regresses), on CPU, fp32.

    Args:
        model: a pipeline adapter. Adapters with their own sampler expose ``sample_latents(prompts, steps,
            guidance, generators)`` (audio); Diffusers image pipelines are called with ``output_type="latent"``,
            which returns the scaled latents before VAE decoding.
        prompts: N prompts. generators: N CPU generators (sample i uses generator i, so a sample does not depend
            on its batch-mates).
        use_reference: sample with the frozen reference (DDO's fakes) instead of the policy.

    Returns:
        ``(N, C, h, w)`` image latents or ``(N, C, T)`` audio latents, float32 CPU.
    """
    if len(generators) != len(prompts):
        raise ValueError(f"need one generator per prompt, got {len(generators)} for {len(prompts)} prompts")
    out = []
    with sampling_network(model, use_reference):
        for i in range(0, len(prompts), batch_size):
            ps, gs = prompts[i:i + batch_size], generators[i:i + batch_size]
            if hasattr(model, "sample_latents"):
                lat = model.sample_latents(ps, num_inference_steps=num_inference_steps,
                                           guidance_scale=guidance_scale, generator=gs, use_reference=use_reference)
            else:
                res = getattr(model, "resolution", None)
                kw = {"height": res, "width": res} if res else {}
                lat = model.pipe(ps, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                 generator=gs, output_type="latent", **kw).images
            out.append(lat.float().cpu())
    return torch.cat(out)


@dataclass
class SharedNoiseLosses:
    """Per-sample denoising losses of policy and reference at one shared (t, ε) draw per sample.

    Attributes:
        model_losses: (N,) fp32, carries the policy graph. ref_losses: (N,) fp32, no graph.
        x_t: (N, ...) noisy inputs both networks saw. timesteps: (N,) long. noise: (N, ...) ε. target: (N, ...).
    """

    model_losses: torch.Tensor
    ref_losses: torch.Tensor
    x_t: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    target: torch.Tensor


def shared_noise_losses(model, x0: torch.Tensor, cond: dict[str, Any], generator: Optional[torch.Generator] = None,
                        reduction: str = "sum", weight: Optional[torch.Tensor] = None) -> SharedNoiseLosses:
    """Policy and reference per-sample losses with (t, ε) drawn once per sample and shared by both networks.

    DDO Eq. 14-16 / Diffusion-KTO: sample i gets one timestep t_i ~ U{0..T−1} (the model's training distribution)
    and one noise ε_i; x_t = add_noise(x0, ε, t); both networks regress the model's own target (ε, v, ...) at the
    same x_t, t and conditioning. The policy runs once on all N rows; the reference runs under ``no_grad``
    (:meth:`DiffusionAdapter.reference`). Samples are not paired with each other.

    Args:
        model: the adapter (``add_noise``, ``target``, ``predict``, ``reference``, ``num_train_timesteps``).
        x0: (N, ...) latents. cond: conditioning with N rows.
        generator: CPU generator (the trainer seeds it per micro-step).
        reduction: "sum" (DDO default, ELBO scale) or "mean" (Diffusion-KTO / DPO) over non-batch elements.
        weight: optional (N,) w(t) multiplying both networks' errors.

    Returns:
        :class:`SharedNoiseLosses`.
    """
    n = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device, x0.dtype)
    t = torch.randint(0, model.num_train_timesteps, (n,), generator=generator, device="cpu").to(x0.device)
    x_t = model.add_noise(x0, noise, t)
    target = model.target(x0, noise, t)
    pred = model.predict(x_t, t, cond)
    losses = per_sample_error(pred, target, reduction, weight)
    with model.reference() as ref:
        pred_ref = model.predict(x_t, t, cond, unet=ref)
        ref_losses = per_sample_error(pred_ref, target, reduction, weight).detach()
    return SharedNoiseLosses(losses, ref_losses, x_t, t, noise, target)


def trainable_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable parameters (LoRA weights, or the whole network)."""
    return {n: p.detach().clone().cpu() for n, p in module.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_snapshot(module: torch.nn.Module, snap: dict[str, torch.Tensor]) -> None:
    """Copy a :func:`trainable_snapshot` back into the module's parameters (in place; optimizer refs survive).

    Raises:
        KeyError: a trainable parameter is missing from ``snap``.
    """
    for n, p in module.named_parameters():
        if p.requires_grad:
            p.copy_(snap[n].to(p.device, p.dtype))


@torch.no_grad()
def merge_lora_into_base(module: torch.nn.Module, lora_state: Optional[dict[str, torch.Tensor]] = None,
                         reset: bool = True, init: Any = "gaussian") -> int:
    """Fold the LoRA deltas into the frozen base weights: W ← W + ΔW (peft ``get_delta_weight``).

    Used for DDO self-play: afterwards the LoRA-disabled network (the ``adapter_off`` reference) *is* the
    previous policy θ*_n, and with ``reset`` the LoRA is re-initialised (B = 0) so the policy starts the new round
    equal to its reference. ``lora_state`` (a :func:`trainable_snapshot`) is loaded into the LoRA first; the
    current LoRA values are restored afterwards when ``reset`` is False (resume: re-applying recorded merges).

    Returns:
        the number of LoRA layers merged (0 means the module has no LoRA: nothing happened).
    """
    from peft.tuners.lora import LoraLayer

    current = trainable_snapshot(module) if not reset else None
    if lora_state is not None:
        load_trainable_snapshot(module, lora_state)
    count = 0
    for mod in module.modules():
        if isinstance(mod, LoraLayer):
            base = mod.get_base_layer()
            for name in list(mod.lora_A.keys()):
                delta = mod.get_delta_weight(name)
                base.weight.data += delta.to(base.weight.dtype)
                if reset:
                    mod.reset_lora_parameters(name, init)
            count += 1
    if current is not None:
        load_trainable_snapshot(module, current)
    return count


def _fingerprint(obj: Any) -> str:
    h = hashlib.sha256()
    if isinstance(obj, dict):
        for k in sorted(obj):
            h.update(k.encode())
            h.update(_fingerprint(obj[k]).encode())
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            h.update(_fingerprint(v).encode())
    elif isinstance(obj, torch.Tensor):
        h.update(obj.detach().cpu().contiguous().float().numpy().tobytes())
    else:
        h.update(repr(obj).encode())
    return h.hexdigest()


def _floats(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def _pool_features(latents: torch.Tensor) -> torch.Tensor:
    """Latents → small feature vectors for a Frechet distance: (N, C, h, w) pooled to 4×4, (N, C, T) to 4."""
    x = latents.float()
    if x.ndim == 4:
        if x.shape[-1] > 4:
            x = F.adaptive_avg_pool2d(x, 4)
    elif x.ndim == 3:
        if x.shape[-1] > 4:
            x = F.adaptive_avg_pool1d(x, 4)
    return x.flatten(1)


@torch.no_grad()
def merged_base_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The network's weights with the current LoRA folded in, under the plain (peft-free) parameter names.

    ``x.base_layer.weight + ΔW`` → ``x.weight``; LoRA tensors dropped. Used to export a self-play DDO model whose
    reference rounds were merged into the base (a LoRA file alone cannot represent it).
    """
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, mod in module.named_modules():
        if isinstance(mod, LoraLayer):
            total = None
            for a in list(mod.lora_A.keys()):
                d = mod.get_delta_weight(a)
                total = d if total is None else total + d
            deltas[f"{name}.base_layer.weight"] = total
    out = {}
    for k, v in module.state_dict().items():
        if "lora_" in k:
            continue
        w = v + deltas[k].to(v.dtype) if k in deltas else v
        out[k.replace(".base_layer.", ".")] = w.detach().clone().cpu()
    return out


def _write_merged_export(model, out_dir, cfg) -> None:
    """Export hook (``model.write_export``): a full Diffusers pipeline whose denoiser has every merged round and
    the current LoRA folded in. No LoRA file is written: after self-play rounds the model is no longer
    base + one LoRA."""
    import copy as _copy

    raw = getattr(model, "_raw_unet", model.unet)
    name = _denoiser_name(model)
    fresh = type(raw).from_config(raw.config)
    fresh.load_state_dict(merged_base_state(raw))
    pipe = _copy.copy(model.pipe)
    setattr(pipe, name, fresh)
    pipe.save_pretrained(str(out_dir))


class DDOData:
    """DDO's real data as model inputs: cached latents ``(N, ...)`` and conditioning of N real rows.

    ``batch(idx)`` → ``{"latents", "cond", "ids"}`` for real rows; the reference's samples ("fakes") are held by
    the objective, per round, and drawn inside :meth:`DDO.loss` with the step's generator.
    """

    def __init__(self, model, latents: torch.Tensor, prompts: list[str], cond: dict[str, Any],
                 skipped: dict[str, int] | None = None, images: torch.Tensor | None = None):
        self.model, self.latents, self.prompts, self.cond = model, latents, list(prompts), cond
        self.images = images
        self.n = latents.shape[0]
        self.skipped = dict(skipped or {})

    def batch(self, idx: torch.Tensor) -> dict[str, Any]:
        from genalign.pipelines.base import cond_to

        dev = self.model.device
        return {"latents": self.latents[idx].to(dev), "cond": cond_to(_cond_rows(self.cond, idx), dev),
                "ids": idx.tolist()}


@_OBJECTIVES.register("ddo", "DDO: real data vs the frozen reference's samples, implicit likelihood-ratio "
                             "discriminator, self-play rounds (Zheng et al. 2025)")
class DDO(Objective):
    """Direct Discriminative Optimization on real images (or audio latents) against the reference's samples.

    Per micro-step: B real rows (from ``data.source`` ``kind: images``) and ``round(B·fake_batch_ratio)`` reference
    samples; each sample gets one (t, ε) shared by the trained network and the reference
    (:func:`shared_noise_losses`); the loss is :func:`ddo_loss` on the per-sample errors (sum reduction by
    default, β = 0.05, α = 4). Fakes come from the frozen reference: generated once per round and cached in
    ``RUN_DIR/ddo/fakes_round{r}.pt`` with the reference's fingerprint (``fake_source: offline``), or sampled
    per micro-step (``online``). Self-play (``rounds > 1``): at the end of each round the round's best
    checkpoint (``round_selection``: the last iterate, or the lowest Frechet distance to the real data among
    candidates taken every ``selection_every`` steps) becomes the new reference **and** initialisation: with LoRA
    and ``reference: adapter_off`` its LoRA is merged into the base weights and re-initialised (B = 0), with a full
    fine-tune and ``frozen_copy`` the frozen copy is overwritten; the optimizer's moments are cleared and fakes
    are regenerated. The round state (round index, merged LoRA snapshots or the frozen copy, selection history)
    is in :meth:`state_dict`, so a resumed run rebuilds the same reference.

    Source: Zheng et al., ICML 2025 (arXiv 2503.01103) Eq. 13-16, §3.3 (rounds); card ddo.md. No official
    training code: sampling of fakes, batch ratio, selection and round length are [unknown → rec.] options.
    """

    class Config(ObjectiveParams):
        alpha: float = Field(4.0, gt=0, description="fake-term weight α [unknown → rec.] (paper grid 0.5-6)")
        beta: float = Field(0.05, gt=0, description="log-ratio scale β, in the convention of `reduction` "
                                                    "[unknown → rec.] (0.01-0.1 at sum scale)")
        reduction: Literal["sum", "mean"] = Field("sum", description="per-sample error reduction [recon]: sum "
                                                                     "(ELBO scale); mean ⇒ β_mean = D·β_sum")
        fake_source: Literal["offline", "online"] = Field(
            "offline", description="reference samples generated once per round and cached, or per step [paper]")
        num_fakes: int | None = Field(None, ge=2, description="reference samples per round (offline); None = as "
                                                              "many as real rows, at most 2048 [unknown → rec.]")
        fake_batch_ratio: float = Field(1.0, gt=0, description="fake rows per real row in a micro-batch "
                                                               "[unknown → rec.] 1 : 1")
        fake_num_inference_steps: int = Field(25, ge=1, description="reference sampler steps [unknown → rec.] "
                                                                    "the pipeline default")
        fake_guidance_scale: float = Field(1.0, ge=0, description="CFG for fakes; off [unknown → rec.]")
        caption_dropout: float = Field(0.0, ge=0, lt=1, description="probability of an empty prompt per sample "
                                                                    "(keep the pretraining value) [2nd]")
        rounds: int = Field(1, ge=1, description="self-play rounds [paper §3.3]")
        steps_per_round: int | None = Field(None, ge=1, description="optimizer steps per round; None = "
                                                                   "ceil(train.steps / rounds)")
        round_selection: Literal["last", "fd"] = Field(
            "last", description="best checkpoint of a round: last iterate, or lowest Frechet distance of samples "
                                "to the real training data [paper: by FID; here a recon]")
        selection_every: int = Field(0, ge=0, description="with round_selection=fd: evaluate a candidate every N "
                                                          "steps (0 = only at round end, i.e. 'last')")
        selection_samples: int = Field(128, ge=4, description="samples per candidate evaluation")
        selection_features: Literal["latents", "digits"] = Field(
            "latents", description="feature space of the selection FD: pooled latents, or the digit classifier")
        selection_num_inference_steps: int = Field(25, ge=1)
        sample_batch_size: int = Field(64, ge=1, description="batch size of fake / selection sampling")

    needs_reference = True
    data_kind = "images"
    data_sources = ("images",)

    def __init__(self, config, model):
        super().__init__(config, model)
        self.round = 0
        self.round_start_step = 0
        self.merged: list[dict[str, torch.Tensor]] = []
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        self.ref_state: dict[str, torch.Tensor] = {}
        self._fakes: dict[str, Any] | None = None
        self._ctx: TrainContext | None = None
        self._optimizers: list = []
        self.total_steps = 0
        self.seed = 0
        self._real_stats = None
        self._clf = None

    # -- data -----------------------------------------------------------------------------------------------
    def build_data(self, ctx: TrainContext) -> DDOData:
        """Real images → cached latents and conditioning; round-0 fakes generated (or loaded) from the reference.

        Raises:
            ValueError: ``data.source`` is not ``kind: images``.
        """
        from genalign.data.images import load_image_data

        cfg = ctx.cfg
        src = cfg.data.source
        if src.kind != "images":
            raise ValueError(f"data.source.kind: {src.kind!r}: ddo needs real data (kind: images)")
        self._ctx, self.seed = ctx, cfg.seed
        self.total_steps = cfg.train.steps
        model = self.model
        res = getattr(model, "resolution", None) or 8
        data = load_image_data(src.source, res, image_column=src.image_column, caption_column=src.caption_column,
                               max_images=src.max_images, hflip=src.hflip, seed=cfg.seed)
        g = torch.Generator().manual_seed(cfg.seed)
        lat = torch.cat([model.encode(data.images[i:i + 64], generator=g).float().cpu()
                         for i in range(0, len(data), 64)])
        cond = encode_prompts(model, data.prompts)
        self._null_cond = encode_prompts(model, [""])
        d = int(lat[0].numel())
        other = "mean" if self.config.reduction == "sum" else "sum"
        logger.info("ddo: beta=%g with %s reduction over D=%d elements = beta=%g with %s reduction",
                    self.config.beta, self.config.reduction, d,
                    convert_beta(self.config.beta, self.config.reduction, other, d), other)
        self.data = DDOData(model, lat, data.prompts, cond, data.skipped, images=data.images)
        if self.config.fake_source == "offline":
            self._ensure_fakes()
        return self.data

    @property
    def steps_per_round(self) -> int:
        c = self.config
        return c.steps_per_round or max(1, math.ceil(max(1, self.total_steps) / c.rounds))

    def reference_fingerprint(self) -> str:
        """Identifies the current reference: model id, round, and every merged snapshot / frozen-copy weight."""
        ident = getattr(getattr(self._ctx, "cfg", None), "pipeline", None)
        return _fingerprint({"model": getattr(ident, "model", "?"), "round": self.round, "merged": self.merged,
                             "ref_state": self.ref_state})

    def _fake_file(self) -> Path | None:
        if self._ctx is None:
            return None
        return Path(self._ctx.run_dir) / "ddo" / f"fakes_round{self.round}.pt"

    def _generate_fakes(self, num: int, seed: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        rows = torch.randint(0, self.data.n, (num,), generator=g)
        prompts = [self.data.prompts[i] for i in rows.tolist()]
        gens = [torch.Generator().manual_seed(seed * 7919 + i) for i in range(num)]
        lat = sample_latents(self.model, prompts, gens, self.config.fake_num_inference_steps,
                             self.config.fake_guidance_scale, use_reference=True,
                             batch_size=self.config.sample_batch_size)
        return {"latents": lat, "rows": rows, "ref_fingerprint": self.reference_fingerprint(), "round": self.round}

    def _ensure_fakes(self) -> dict[str, Any]:
        """The current round's offline fakes: loaded from the run folder, or generated by rank 0 and saved.

        Raises:
            RuntimeError: the cached file was produced by a different reference than the current one.
        """
        if self._fakes is not None and self._fakes["round"] == self.round:
            return self._fakes
        path = self._fake_file()
        acc = getattr(self._ctx, "accelerator", None)
        want = self.reference_fingerprint()
        if path is None:
            fakes = self._generate_fakes(self.config.num_fakes or min(self.data.n, 2048), self.seed * 31 + self.round)
        else:
            if (acc is None or acc.is_main_process) and not path.exists():
                fakes = self._generate_fakes(self.config.num_fakes or min(self.data.n, 2048),
                                             self.seed * 31 + self.round)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                torch.save(fakes, tmp)
                tmp.replace(path)
            if acc is not None:
                acc.wait_for_everyone()
            fakes = torch.load(path, weights_only=True)
        if fakes["ref_fingerprint"] != want:
            raise RuntimeError(f"{path}: DDO fake cache was generated by a different reference (round "
                               f"{fakes.get('round')}); delete it to regenerate")
        fakes["cond"] = _cond_rows(self.data.cond, fakes["rows"])
        self._fakes = fakes
        return fakes

    def _fake_batch(self, num: int, generator: Optional[torch.Generator]):
        from genalign.pipelines.base import cond_to

        dev = self.model.device
        if self.config.fake_source == "offline":
            fakes = self._ensure_fakes()
            idx = torch.randint(0, fakes["latents"].shape[0], (num,), generator=generator)
            return fakes["latents"][idx].to(dev), cond_to(_cond_rows(fakes["cond"], idx), dev)
        rows = torch.randint(0, self.data.n, (num,), generator=generator)
        seeds = torch.randint(0, 2**31 - 1, (num,), generator=generator).tolist()
        lat = sample_latents(self.model, [self.data.prompts[i] for i in rows.tolist()],
                             [torch.Generator().manual_seed(s) for s in seeds], self.config.fake_num_inference_steps,
                             self.config.fake_guidance_scale, use_reference=True)
        return lat.to(dev), cond_to(_cond_rows(self.data.cond, rows), dev)

    # -- loss -----------------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> LossOutput:
        """DDO on B real rows + round(B·ratio) reference samples; metrics ``d_real``, ``d_fake``, ``disc_acc``, ..."""
        from genalign.pipelines.base import cond_to

        c = self.config
        real, cond_real = batch["latents"], batch["cond"]
        b = real.shape[0]
        bf = max(1, int(round(b * c.fake_batch_ratio)))
        fake, cond_fake = self._fake_batch(bf, generator)
        x0 = torch.cat([real, fake.to(real.dtype)])
        cond = cat_cond([cond_real, cond_fake])
        if c.caption_dropout > 0:
            drop = torch.rand(x0.shape[0], generator=generator) < c.caption_dropout
            null = cond_to(cat_cond([self._null_cond] * x0.shape[0]), real.device)
            cond = _cond_where(~drop, cond, null)
        out = shared_noise_losses(self.model, x0, cond, generator, reduction=c.reduction)
        loss, metrics = ddo_loss(out.model_losses[:b], out.ref_losses[:b], out.model_losses[b:],
                                 out.ref_losses[b:], alpha=c.alpha, beta=c.beta)
        metrics = _floats(metrics)
        metrics.pop("loss", None)  # the trainer logs the loss itself
        metrics["round"] = float(self.round)
        return LossOutput(loss, metrics)

    # -- rounds ---------------------------------------------------------------------------------------------
    def _raw(self):
        return getattr(self.model, "_raw_unet", self.model.unet)

    @torch.no_grad()
    def selection_score(self) -> float:
        """Frechet distance (lower is better) of ``selection_samples`` policy samples to the real training data,
        in pooled-latent or digit-classifier feature space (fixed seeds, so candidates see the same noise)."""
        from genalign.rewards.fad import frechet_distance, gaussian_stats

        c = self.config
        n = c.selection_samples
        g = torch.Generator().manual_seed(self.seed + 99991)
        rows = torch.randint(0, self.data.n, (n,), generator=g)
        gens = [torch.Generator().manual_seed(self.seed * 104729 + i) for i in range(n)]
        lat = sample_latents(self.model, [self.data.prompts[i] for i in rows.tolist()], gens,
                             c.selection_num_inference_steps, 1.0, batch_size=c.sample_batch_size)
        if c.selection_features == "digits":
            from genalign.rewards.digits import DigitClassifierReward

            self._clf = self._clf or DigitClassifierReward()
            feats = self._clf.features(self.model.decode(lat.to(self.model.device)).float().cpu())
            if self._real_stats is None:
                self._real_stats = gaussian_stats(self._clf.features(self.data.images).double())
        else:
            feats = _pool_features(lat)
            if self._real_stats is None:
                self._real_stats = gaussian_stats(_pool_features(self.data.latents).double())
        mu, cov = gaussian_stats(feats.double())
        return float(frechet_distance(mu, cov, *self._real_stats))

    def _consider_candidate(self, step: int) -> None:
        score = self.selection_score()
        self.history.append({"round": self.round, "step": step, "fd": score})
        if not self.best or score < self.best["score"]:
            self.best = {"score": score, "step": step, "snapshot": trainable_snapshot(self._raw())}
        logger.info("ddo round %d step %d: selection FD %.4f (best %.4f at step %d)", self.round, step, score,
                    self.best["score"], self.best["step"])

    def on_step_end(self, step: int, optimizers: list | None = None) -> None:
        """Trainer hook after every optimizer step: selection candidates and round switches.

        Round r < rounds − 1 ends after ``steps_per_round`` steps; the last round runs until ``train.steps``.
        """
        c = self.config
        self._optimizers = list(optimizers or [])
        in_round = step - self.round_start_step
        last_round = self.round >= c.rounds - 1
        round_over = step >= self.total_steps if last_round else in_round >= self.steps_per_round
        if c.round_selection == "fd" and c.selection_every and in_round % c.selection_every == 0 and not round_over:
            self._consider_candidate(step)
        if round_over and not getattr(self, "finished", False):
            self.end_round(step)

    def end_round(self, step: int) -> None:
        """Close the current round at ``step``: load its best checkpoint into the policy; unless it was the last
        round, make that checkpoint the new reference (and initialisation) and regenerate the fakes.

        Raises:
            NotImplementedError: LoRA with ``reference: frozen_copy`` and more than one round.
        """
        c = self.config
        raw = self._raw()
        if c.round_selection == "fd":
            self._consider_candidate(step)
            load_trainable_snapshot(raw, self.best["snapshot"])
            chosen = self.best["step"]
        else:
            chosen = step
        self.history.append({"round": self.round, "selected_step": chosen, "end_step": step})
        self.best = {}
        if self.round >= c.rounds - 1:
            self.finished = True
            return
        self.switch_reference()
        self.round_start_step = step
        if c.fake_source == "offline" and self._ctx is not None:
            self._ensure_fakes()

    @torch.no_grad()
    def switch_reference(self) -> None:
        """The current policy becomes the reference and the new initialisation (round += 1); fakes invalidated."""
        raw = self._raw()
        lora = getattr(self.model, "lora", None)
        if getattr(self.model, "ref_unet", None) is None:
            snap = trainable_snapshot(raw)
            torch.manual_seed(self.seed * 1009 + self.round)  # deterministic re-initialisation of LoRA A
            init = getattr(lora, "init", "gaussian")
            if merge_lora_into_base(raw, None, reset=True, init=init if init == "gaussian" else True) == 0:
                raise RuntimeError("ddo rounds: reference adapter_off but the network has no LoRA layers")
            self.merged.append(snap)
            self._install_export_hook()
        else:
            if lora is not None:
                raise NotImplementedError("ddo rounds with LoRA need reference: adapter_off (frozen_copy is for "
                                          "full fine-tunes)")
            self.model.ref_unet.load_state_dict(raw.state_dict())
            self.ref_state = {k: v.detach().clone().cpu() for k, v in raw.state_dict().items()}
        for opt in self._optimizers:  # new round, fresh optimizer moments (the paper restarts from θ*_n)
            inner = getattr(opt, "optimizer", opt)
            inner.state.clear()
        self.round += 1
        self._fakes = None
        logger.info("ddo: round %d starts; reference = previous round's selected checkpoint", self.round)

    def _install_export_hook(self) -> None:
        """After a LoRA merge the export must save the merged network (``export.py`` calls ``write_export``)."""
        import types

        self.model.write_export = types.MethodType(_write_merged_export, self.model)

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Round index and start step, merged LoRA snapshots (or the frozen copy), selection history/best."""
        best = {k: v for k, v in self.best.items()}
        return {"round": self.round, "round_start_step": self.round_start_step, "merged": list(self.merged),
                "ref_state": dict(self.ref_state), "history": json.dumps(self.history), "best": best,
                "finished": bool(getattr(self, "finished", False))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild the reference of a saved round: re-apply recorded LoRA merges to the freshly loaded base (the
        trainable LoRA itself comes from the checkpoint) or load the frozen copy; fakes are reloaded lazily."""
        raw = self._raw()
        self.round = int(state.get("round", 0))
        self.round_start_step = int(state.get("round_start_step", 0))
        self.merged = list(state.get("merged", []))
        for snap in self.merged:
            merge_lora_into_base(raw, snap, reset=False)
        if self.merged:
            self._install_export_hook()
        self.ref_state = dict(state.get("ref_state", {}))
        if self.ref_state and getattr(self.model, "ref_unet", None) is not None:
            self.model.ref_unet.load_state_dict(self.ref_state)
        self.history = json.loads(state.get("history", "[]"))
        self.best = dict(state.get("best", {}))
        self.finished = bool(state.get("finished", False))
        self._fakes = None

    def summary_metrics(self) -> dict[str, Any]:
        """For summary.json: rounds completed, the selection history, the β convention."""
        return {"rounds": self.config.rounds, "final_round": self.round, "round_history": self.history,
                "beta": self.config.beta, "reduction": self.config.reduction}
