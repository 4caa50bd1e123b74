"""Diff-Instruct* (DI*) — score-based RLHF for one-step generators (Luo et al., ICML 2025, arXiv 2410.20898).

DI* post-trains a one-step generator g_θ to maximise an explicit reward while staying close to a CFG-guided
frozen teacher under a *score-based* divergence (pseudo-Huber distance between the generator's marginal score and
the teacher's score, integrated over diffusion time)::

    min_θ  E[−α·r(decode(g_θ(z, c)), c)] + ∫ w(t) E_{x_t~p_θ,t}[ d(s_{p_θ,t}(x_t) − s^ω_ref,t(x_t)) ] dt,
    d(y) = sqrt(‖y‖² + c²) − c.

The divergence is minimised through the tractable surrogate L_div = −w(t)·⟨d'(y), s_ψ(x_t) − ∇log q_t(x_t|x0)⟩ with
y = s_ψ − s_ref and an online fake-score network ψ that tracks the generator's marginals (trained with plain
denoising score matching on *detached* generator samples). The generator gradient must flow through the input
Jacobians of both frozen networks (also inside d'(y)); detaching their outputs makes it exactly zero, detaching
only the teacher removes the signal, and detaching only d'(y) (ablation) is unbiased only if the fake score is
exact. There is no official training code: the surrogate's form and sign follow the card ([recon]) and were
checked on analytic Gaussian problems (tests; see the discrepancy below); its L2 special case equals SiD-LSG's
official generator loss with α = 1 [code];
the fake loss is [code] (SiD-LSG, DMD2). Reconstructions / recommendations exposed as arguments: the ε-unit
form of the divergence with w_ε(t) = 1 and c_ε = 0.00054·sqrt(D) ([unknown → rec.], card §2.5), the CFG
convention (ω vs ω − 1, [unknown → rec.] ω = 7.5 diffusers convention), the In/Out-CFG placement ([card] In),
the t range U{20..980} ([unknown → rec.]), and the ``detach_direction`` ablation.

Discrepancy found while testing (see tests/objectives/test_di_star.py): the card's surrogate (``surrogate="sim"``,
the default, as in the card and SIM; its L2 case is SiD-LSG with α = 1) has the exact divergence gradient only
when ∇_x(s_ψ − s_ref) vanishes in expectation (e.g. teacher and generator marginals with equal covariance). In
general, integrating the score-projection identity by parts gives
``∇_θ ∫w E d(y) = ∇_θ E[ w·d(y(x_t)) − w·⟨d'(y), s_ψ − ∇log q(x_t|x0)⟩ ]`` (networks frozen, gradient through x_t),
i.e. one more term +w·d(y); ``surrogate="exact"`` adds it (L2 case = SiD-LSG with α = 0.5). On a 2-D Gaussian
problem with teacher variance ≠ generator variance the "sim" gradient is off by the ratio of the variances (48 %
error at σ_r = 0.5) while "exact" matches to < 1 %. Which one DI* used is unknown ([unknown → rec.]: "sim").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch

__all__ = [
    "DiStarConfig",
    "teacher_cfg",
    "effective_guidance_scale",
    "default_huber_c",
    "di_star_divergence",
    "di_star_generator_loss",
    "di_star_fake_score_loss",
    "noisy_sample",
    "sample_timesteps",
    "x0_from_noise",
]

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TeacherFn = Callable[[torch.Tensor, torch.Tensor], Tuple[Optional[torch.Tensor], torch.Tensor]]


@dataclass
class DiStarConfig:
    """DI* hyperparameters with provenance tags (see /work/shared/methods/di_star.md §3)."""

    alpha: float = 100.0  # [card] README "α_rev" (ablated 0, 1, 10, 100)
    guidance_scale: float = 7.5  # [card] README "α_cfg" = 7.5 (4.5 ablated)
    cfg_convention: str = "omega"  # [unknown → rec.] "omega" (diffusers ω = 7.5) | "omega_minus_one" (ω = 8.5)
    cfg_placement: str = "in"  # [card] In-CFG best; "out" = DI*-OUT ablation (implicit CFG reward, [recon])
    distance: str = "pseudo_huber"  # [2nd] pseudo-Huber; "l2" = SiD special case
    units: str = "epsilon"  # [unknown → rec.] divergence in ε-units (w_ε, c_ε); "score" = score units (w, c)
    huber_c: Optional[float] = None  # [unknown → rec.] None ⇒ c_ε = 0.00054·sqrt(D)
    weight: float = 1.0  # [unknown → rec.] w_ε(t) = 1 (ε units)
    t_min: int = 20  # [unknown → rec.] SiD-LSG tmin
    t_max: int = 980  # [unknown → rec.] SiD-LSG tmax
    init_timestep: int = 399  # [card]/[code] DMD2 `--conditioning_timestep 399` (SDXL one-step input)
    fake_steps_per_generator_step: int = 1  # [unknown → rec.] k_fake (SiD-LSG); DMD2-SDXL uses 5
    detach_direction: bool = False  # [recon] ablation only — biased gradient
    surrogate: str = "sim"  # [recon] "sim" = card/SIM form (SiD α=1); "exact" adds +d(y) (exact gradient, SiD α=0.5)
    learning_rate_generator: float = 1e-6  # [unknown → rec.] Adam (0, 0.999), eps 1e-8 (SiD-LSG)
    learning_rate_fake: float = 1e-6  # [unknown → rec.]
    adam_betas: Tuple[float, float] = (0.0, 0.999)  # [unknown → rec.]
    ema_generator: bool = True  # [unknown → rec.] keep an EMA of the generator for evaluation
    time_ids: Tuple[int, ...] = (1024, 1024, 0, 0, 1024, 1024)  # [recon] SDXL micro-conditioning
    uncond_zero_embeddings: bool = True  # [unknown → rec.] force_zeros_for_empty_prompt for the teacher's ∅ branch


# --------------------------------------------------------------------------------------------------------------


def effective_guidance_scale(guidance_scale: float, convention: str = "omega") -> float:
    """ω in the diffusers convention: ``"omega"`` ⇒ ω = guidance_scale; ``"omega_minus_one"`` ⇒ ω = scale + 1.

    The README's α_cfg = 7.5 may be either ([unknown → rec.]: "omega"). Raises ValueError on an unknown convention.
    """
    if convention == "omega":
        return float(guidance_scale)
    if convention == "omega_minus_one":
        return float(guidance_scale) + 1.0
    raise ValueError(f"cfg_convention must be 'omega' or 'omega_minus_one', got {convention!r}")


def teacher_cfg(
    eps_uncond: Optional[torch.Tensor],
    eps_cond: torch.Tensor,
    guidance_scale: float,
    convention: str = "omega",
) -> torch.Tensor:
    """Classifier-free guided teacher prediction ε^ω = ε_∅ + ω·(ε_c − ε_∅), in fp32.

    Args:
        eps_uncond: (B, ...) unconditional ε-prediction (may be None when ω = 1).
        eps_cond: (B, ...) conditional ε-prediction.
        guidance_scale, convention: see :func:`effective_guidance_scale`.

    Returns ε_c itself (upcast) when ω = 1, so "fake = teacher, ω = 1" gives an exactly zero difference.
    Raises ValueError on shape mismatch or a missing unconditional branch.
    """
    omega = effective_guidance_scale(guidance_scale, convention)
    ec = eps_cond.to(torch.float32)
    if omega == 1.0:
        return ec
    if eps_uncond is None:
        raise ValueError(f"eps_uncond is required for guidance scale ω = {omega}")
    if eps_uncond.shape != eps_cond.shape:
        raise ValueError(f"eps_uncond {tuple(eps_uncond.shape)} and eps_cond {tuple(eps_cond.shape)} differ")
    eu = eps_uncond.to(torch.float32)
    return eu + omega * (ec - eu)


def default_huber_c(num_elements: int) -> float:
    """Recommended pseudo-Huber constant in ε units: c_ε = 0.00054·sqrt(D) ([unknown → rec.], borrowed from iCT)."""
    if num_elements < 1:
        raise ValueError("num_elements must be >= 1")
    return 0.00054 * math.sqrt(num_elements)


def _bview(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.view((-1,) + (1,) * (like.ndim - 1))


def _schedule(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, B: int) -> Tuple[torch.Tensor, torch.Tensor]:
    if alphas_cumprod.ndim != 1:
        raise ValueError("alphas_cumprod must be a 1-D tensor (T,)")
    if timesteps.ndim != 1 or timesteps.shape[0] != B:
        raise ValueError(f"timesteps must have shape ({B},), got {tuple(timesteps.shape)}")
    t = timesteps.long().to(alphas_cumprod.device)
    if (t < 0).any() or (t >= alphas_cumprod.shape[0]).any():
        raise ValueError(f"timesteps must lie in [0, {alphas_cumprod.shape[0] - 1}]")
    ab = alphas_cumprod.to(torch.float64)[t]
    return ab.sqrt().to(torch.float32), (1 - ab).sqrt().to(torch.float32)


def noisy_sample(
    x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """x_t = a_t·x0 + s_t·ε (VP), fp32, keeping x0's graph. x0/noise (B, ...), timesteps (B,) into alphas_cumprod (T,)."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ")
    a, s = _schedule(timesteps, alphas_cumprod, x0.shape[0])
    a, s = a.to(x0.device), s.to(x0.device)
    return _bview(a, x0) * x0.to(torch.float32) + _bview(s, x0) * noise.to(torch.float32)


def sample_timesteps(
    batch_size: int,
    t_min: int = 20,
    t_max: int = 980,
    generator: Optional[torch.Generator] = None,
    device: Union[str, torch.device] = "cpu",
) -> torch.Tensor:
    """t ~ U{t_min..t_max} (inclusive), (B,) long ([unknown → rec.] 20..980 as SiD-LSG)."""
    if not 0 <= t_min <= t_max:
        raise ValueError(f"need 0 <= t_min <= t_max, got {t_min}, {t_max}")
    return torch.randint(t_min, t_max + 1, (batch_size,), generator=generator).to(device)


def x0_from_noise(
    z: torch.Tensor, eps_hat: torch.Tensor, timestep: Union[int, torch.Tensor], alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """One-step generator mapping x0 = (z − sqrt(1 − ᾱ_t)·ε̂)/sqrt(ᾱ_t) (DMD2 ``get_x0_from_noise``), fp32.

    Args:
        z: (B, ...) input noise fed to the UNet as x_t.
        eps_hat: (B, ...) the UNet's ε-prediction at t (with graph).
        timestep: int (e.g. 399 for DMD2/DI*-SDXL, ᾱ_399 = 0.426086 under SDXL's scaled-linear schedule) or (B,).
        alphas_cumprod: (T,) schedule.

    Equals ``LCMScheduler(timesteps=[399]).step(...).denoised`` up to LCM's c_skip(399) ≈ 1.6e-8.
    """
    if z.shape != eps_hat.shape:
        raise ValueError(f"z {tuple(z.shape)} and eps_hat {tuple(eps_hat.shape)} differ")
    t = torch.full((z.shape[0],), int(timestep)) if not isinstance(timestep, torch.Tensor) else timestep
    a, s = _schedule(t, alphas_cumprod, z.shape[0])
    a, s = _bview(a.to(z.device), z), _bview(s.to(z.device), z)
    return (z.to(torch.float32) - s * eps_hat.to(torch.float32)) / a


def di_star_divergence(
    eps_fake: torch.Tensor,
    eps_ref: torch.Tensor,
    noise: torch.Tensor,
    *,
    sigma: Optional[torch.Tensor] = None,
    distance: str = "pseudo_huber",
    units: str = "epsilon",
    huber_c: Optional[float] = None,
    weight: Union[float, torch.Tensor, None] = None,
    detach_direction: bool = False,
    surrogate: str = "sim",
) -> torch.Tensor:
    """Per-sample DI* divergence surrogate L_div from *precomputed* predictions.

    The predictions must have been computed from x_t = a_t·x0 + s_t·ε **with x0's graph** by frozen networks whose
    outputs were not detached (otherwise the generator gets no gradient).

    Args:
        eps_fake: (B, ...) fake-score ε_ψ(x_t, t, c).
        eps_ref: (B, ...) teacher ε^ω(x_t, t, c) (after CFG, see :func:`teacher_cfg`).
        noise: (B, ...) the ε used to build x_t (a constant).
        sigma: (B,) s_t = sqrt(1 − ᾱ_t); required for ``units="score"``.
        distance: "pseudo_huber" (d(y) = sqrt(‖y‖² + c²) − c, norm over all per-sample elements) or "l2"
            (d(y) = ‖y‖², SiD).
        units: "epsilon" (reconstruction/recommendation, card §2.5): with u = ε_ψ − ε^ω, v = ε_ψ − ε,
            ``L = −w_ε·⟨d'(u), v⟩``; "score": with y = s_ψ − s_ref = −u/s_t and s_ψ − ∇log q = −v/s_t,
            ``L = −w·⟨d'(y), −v/s_t⟩``. The two coincide for w = s_t·w_ε and c = c_ε/s_t (pseudo-Huber).
        huber_c: c > 0 (c ≥ 0 allowed; at c = 0, d'(u) = u/‖u‖) in the chosen units; None ⇒ ε units
            c_ε = 0.00054·sqrt(D) (reconstruction/recommendation; must be given explicitly for score units).
        weight: w(t): float or (B,) tensor; None ⇒ 1 (reconstruction/recommendation w_ε = 1).
        detach_direction: ablation only (reconstruction): stop the gradient through d'(·) — biased.
        surrogate: "sim" (default, the card's / SIM's form ``−w⟨d'(y), s_ψ − ∇log q⟩``; its L2 case is SiD with
            α_SiD = 1) or "exact" (reconstruction: adds ``+w·d(y(x_t))`` differentiated through x_t). Only
            "exact" has the exact gradient of ∫w E_{p_θ,t} d(s_θ − s_ref) in general (checked on Gaussians with
            unequal generator/teacher covariances; its L2 case is SiD with α_SiD = 0.5); the two agree when
            ∇_x(s_ψ − s_ref) = 0, e.g. equal covariances. See the module docstring.

    Returns:
        (B,) fp32 per-sample surrogate. For "sim" only its gradient is meaningful (its expectation at ψ = θ is 0);
        for "exact" its expectation at ψ = θ also equals the divergence.

    Raises:
        ValueError: shape mismatches, unknown distance/units, missing sigma or c for score units, c < 0.

    Source: di_star.md §2.2 (surrogate, sign: y = fake − ref with a leading minus) and §2.5 (ε units).
    """
    if not (eps_fake.shape == eps_ref.shape == noise.shape):
        raise ValueError(
            f"eps_fake {tuple(eps_fake.shape)}, eps_ref {tuple(eps_ref.shape)} and noise {tuple(noise.shape)} "
            "must have the same shape"
        )
    if eps_fake.ndim < 2:
        raise ValueError("predictions must be (B, ...) with at least one non-batch dim")
    if distance not in ("pseudo_huber", "l2"):
        raise ValueError(f"distance must be 'pseudo_huber' or 'l2', got {distance!r}")
    if units not in ("epsilon", "score"):
        raise ValueError(f"units must be 'epsilon' or 'score', got {units!r}")
    if surrogate not in ("sim", "exact"):
        raise ValueError(f"surrogate must be 'sim' or 'exact', got {surrogate!r}")
    B = eps_fake.shape[0]
    D = eps_fake[0].numel()
    ef = eps_fake.to(torch.float32).flatten(1)
    er = eps_ref.to(torch.float32).flatten(1)
    n = noise.to(torch.float32).flatten(1)
    u = ef - er
    v = ef - n
    if units == "score":
        if sigma is None or sigma.shape != (B,):
            raise ValueError(f"units='score' needs sigma of shape ({B},)")
        if distance == "pseudo_huber" and huber_c is None:
            raise ValueError("units='score' with pseudo_huber needs an explicit huber_c (score units)")
        s = sigma.to(torch.float32).to(ef.device).view(-1, 1)
        y = -u / s
        grad_q = -v / s  # s_ψ − ∇log q(x_t|x0)
    else:
        y, grad_q = u, v
    if distance == "pseudo_huber":
        c = default_huber_c(D) if huber_c is None else float(huber_c)
        if c < 0:
            raise ValueError(f"huber_c must be >= 0, got {c}")
        y_dir = y.detach() if detach_direction else y
        norm = torch.sqrt((y_dir**2).sum(dim=1, keepdim=True) + c * c)
        d_prime = y_dir / norm.clamp_min(torch.finfo(torch.float32).tiny)
        d_value = torch.sqrt((y**2).sum(dim=1) + c * c) - c
    else:
        d_prime = 2.0 * (y.detach() if detach_direction else y)
        d_value = (y**2).sum(dim=1)
    if weight is None:
        w = torch.ones(B, dtype=torch.float32, device=ef.device)
    else:
        w = torch.as_tensor(weight, dtype=torch.float32, device=ef.device)
        w = w.expand(B) if w.ndim == 0 else w
        if w.shape != (B,):
            raise ValueError(f"weight must be a scalar or ({B},), got {tuple(w.shape)}")
    out = -w * (d_prime * grad_q).sum(dim=1)
    if surrogate == "exact":
        out = out + w * d_value
    return out


def di_star_generator_loss(
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    fake_eps_fn: EpsFn,
    teacher_eps_fn: TeacherFn,
    reward: Optional[torch.Tensor] = None,
    *,
    alpha: float = 100.0,
    guidance_scale: float = 7.5,
    cfg_convention: str = "omega",
    cfg_placement: str = "in",
    distance: str = "pseudo_huber",
    units: str = "epsilon",
    huber_c: Optional[float] = None,
    weight: Union[float, torch.Tensor, None] = None,
    detach_direction: bool = False,
    surrogate: str = "sim",
) -> Tuple[torch.Tensor, dict]:
    """DI* generator loss L_G = mean_b[−α·r_b + L_div,b (+ L_cfg,b for Out-CFG)].

    Args:
        x0: (B, ...) generator output g_θ(z, c) **with graph** (latent space).
        noise: (B, ...) ε ~ N(0, I) for the diffusion of x0 (constant).
        timesteps: (B,) integer t (recommend :func:`sample_timesteps`, U{20..980}).
        alphas_cumprod: (T,) the teacher's ᾱ schedule.
        fake_eps_fn: ``(x_t, t) -> ε_ψ`` the fake-score network with its conditioning closed over; its parameters
            must be frozen (``requires_grad_(False)``) for this step but its output must NOT be detached.
        teacher_eps_fn: ``(x_t, t) -> (ε_ref(x_t, ∅) or None, ε_ref(x_t, c))`` the frozen teacher (output not
            detached). The unconditional branch may be None when ω = 1 and placement is "in".
        reward: optional (B,) differentiable reward r(decode(x0), c) (higher is better), computed by the caller.
        alpha: reward scale α ≥ 0 ([card] 100).
        guidance_scale, cfg_convention: teacher CFG ([card] 7.5; convention [unknown → rec.] "omega").
        cfg_placement: "in" ([card], y uses ε^ω) or "out" (reconstruction: y uses the conditional teacher and the
            implicit CFG reward ``L_cfg = −(ω − 1)·w·⟨sg[s_ref(x_t|c) − s_ref(x_t|∅)], x_t⟩`` is added; in ε units
            this is ``(ω − 1)·w_ε·⟨sg[ε_c − ε_∅], x_t⟩``). With ω = 1 both placements coincide.
        distance, units, huber_c, weight, detach_direction, surrogate: see :func:`di_star_divergence`
            (reconstruction/recommendation defaults: ε units, w_ε = 1, c_ε = 0.00054·sqrt(D), surrogate "sim").

    Returns:
        ``(loss, metrics)``; metrics: ``loss``, ``div_loss``, ``cfg_loss``, ``reward`` (mean r),
        ``reward_term`` (−α·mean r), ``u_norm`` (mean ‖ε_ψ − ε^ω‖), ``fake_dsm`` (mean per-element
        ‖ε_ψ − ε‖²), ``huber_c``.

    Raises:
        ValueError: shape problems, α < 0, unknown placement/convention, reward of the wrong shape.

    Source: di_star.md §2.1–2.2, §2.5; SiD-LSG ``training/sid_training_loop.py`` L486–528 for the L2 case.
    """
    if x0.shape != noise.shape or x0.ndim < 2:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must be equal (B, ...) shapes")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if cfg_placement not in ("in", "out"):
        raise ValueError(f"cfg_placement must be 'in' or 'out', got {cfg_placement!r}")
    B = x0.shape[0]
    omega = effective_guidance_scale(guidance_scale, cfg_convention)
    a, s = _schedule(timesteps, alphas_cumprod, B)
    a, s = a.to(x0.device), s.to(x0.device)
    x_t = _bview(a, x0) * x0.to(torch.float32) + _bview(s, x0) * noise.to(torch.float32)

    eps_fake = fake_eps_fn(x_t, timesteps)
    eps_uncond, eps_cond = teacher_eps_fn(x_t, timesteps)
    if eps_fake.shape != x0.shape or eps_cond.shape != x0.shape:
        raise ValueError("network predictions must have x0's shape")
    if cfg_placement == "in":
        eps_ref = teacher_cfg(eps_uncond, eps_cond, omega, "omega")
    else:
        eps_ref = eps_cond.to(torch.float32)

    c = huber_c
    if c is None and units == "epsilon" and distance == "pseudo_huber":
        c = default_huber_c(x0[0].numel())
    per_sample = di_star_divergence(
        eps_fake, eps_ref, noise, sigma=s, distance=distance, units=units, huber_c=c, weight=weight,
        detach_direction=detach_direction, surrogate=surrogate,
    )
    div_loss = per_sample.mean()

    cfg_loss = torch.zeros((), dtype=torch.float32, device=x0.device)
    if cfg_placement == "out" and omega != 1.0:
        if eps_uncond is None:
            raise ValueError("Out-CFG with ω != 1 needs the teacher's unconditional prediction")
        w = torch.ones(B, device=x0.device) if weight is None else torch.as_tensor(weight, dtype=torch.float32,
                                                                                   device=x0.device).expand(B)
        if units == "score":
            w = w / s  # −w⟨sg[−(ε_c − ε_∅)/s], x_t⟩ = (w/s)⟨sg[ε_c − ε_∅], x_t⟩
        diff = (eps_cond.to(torch.float32) - eps_uncond.to(torch.float32)).detach().flatten(1)
        cfg_loss = ((omega - 1.0) * w * (diff * x_t.flatten(1)).sum(dim=1)).mean()

    loss = div_loss + cfg_loss
    reward_mean = torch.zeros((), dtype=torch.float32, device=x0.device)
    if reward is not None:
        if reward.shape != (B,):
            raise ValueError(f"reward must have shape ({B},), got {tuple(reward.shape)}")
        reward_mean = reward.to(torch.float32).mean()
        loss = loss - alpha * reward_mean
    with torch.no_grad():
        ef = eps_fake.detach().to(torch.float32)
        metrics = {
            "loss": loss.detach(),
            "div_loss": div_loss.detach(),
            "cfg_loss": cfg_loss.detach(),
            "reward": reward_mean.detach(),
            "reward_term": (-alpha * reward_mean).detach(),
            "u_norm": (ef - eps_ref.detach()).flatten(1).norm(dim=1).mean(),
            "fake_dsm": ((ef - noise.to(torch.float32)) ** 2).mean(),
            "huber_c": torch.tensor(float(c) if c is not None else float("nan")),
        }
    return loss, metrics


def di_star_fake_score_loss(
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    fake_eps_fn: EpsFn,
) -> Tuple[torch.Tensor, dict]:
    """Fake-score ("assistant") denoising loss L_ψ = mean_b mean_elements ‖ε_ψ(x_t, t, c) − ε‖², no CFG.

    x_t = a_t·sg[x0] + s_t·ε: the generator sample is detached here, so generator parameters get no gradient.

    Args:
        x0: (B, ...) generator samples (detached internally).
        noise: (B, ...) ε; timesteps: (B,); alphas_cumprod: (T,).
        fake_eps_fn: ``(x_t, t) -> ε_ψ`` trainable fake-score network with its (conditional) embeddings.

    Returns ``(loss, {"loss", "fake_loss"})``. Raises ValueError on shape mismatch.

    Source: SiD-LSG ``training/sid_training_loop.py`` L439–443; DMD2 ``main/sd_guidance.py`` ([code]).
    """
    if x0.shape != noise.shape or x0.ndim < 2:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must be equal (B, ...) shapes")
    x_t = noisy_sample(x0.detach(), noise, timesteps, alphas_cumprod)
    eps = fake_eps_fn(x_t, timesteps)
    if eps.shape != x0.shape:
        raise ValueError(f"fake prediction {tuple(eps.shape)} must match x0 {tuple(x0.shape)}")
    per_sample = ((eps.to(torch.float32) - noise.to(torch.float32)) ** 2).flatten(1).mean(dim=1)
    loss = per_sample.mean()
    return loss, {"loss": loss.detach(), "fake_loss": loss.detach()}


# --------------------------------------------------------------------------------------------------------------
# The trainer objective (phases: fake-score update, then generator update)
# --------------------------------------------------------------------------------------------------------------

import contextlib  # noqa: E402
import copy  # noqa: E402
from typing import Any, Iterator, Literal  # noqa: E402

from pydantic import Field, model_validator  # noqa: E402

from genalign.objectives.base import LossOutput, Objective, ObjectiveParams, Phase  # noqa: E402
from genalign.registry import objectives as OBJECTIVES  # noqa: E402


def require_few_step(model, objective: str) -> None:
    """Raise ValueError unless ``model`` is a ``few_step`` adapter (:mod:`genalign.pipelines.few_step`)."""
    if not hasattr(model, "generate_latents"):
        raise ValueError(f"objective {objective!r} trains a one-/few-step generator: use `pipeline.name: few_step` "
                         f"(got the {type(model).__name__} adapter)")


@contextlib.contextmanager
def frozen_parameters(params) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on ``params`` (restored on exit).

    Autograd records whether a leaf needs a gradient when the forward runs, so a network called inside this
    context passes gradients to its *inputs* only, even if the backward runs after the context has exited. This is
    how the generator phase keeps ψ frozen without detaching the fake network's output (di_star.md §2.2).
    """
    params = list(params)
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def load_generator_init(unet: torch.nn.Module, source: str) -> None:
    """Load generator weights (e.g. DMD2's ``dmd2_sdxl_1step_unet_fp16.bin``) into ``unet`` in place.

    Args:
        unet: the generator UNet (full fine-tune; LoRA-wrapped UNets have different keys).
        source: a Diffusers UNet folder, a ``.safetensors`` file or a torch ``.bin`` / ``.pt`` state dict.

    Raises:
        FileNotFoundError: ``source`` does not exist. RuntimeError: keys or shapes do not match.
    """
    from pathlib import Path

    p = Path(source)
    if not p.exists():
        raise FileNotFoundError(f"objective.generator_init: {source!r} not found (a UNet folder or state-dict file)")
    if p.is_dir():
        from diffusers import UNet2DConditionModel

        state = UNet2DConditionModel.from_pretrained(str(p)).state_dict()
    elif p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    with torch.no_grad():
        unet.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)


@OBJECTIVES.register("di_star", "Diff-Instruct*: one-step generator, reward + pseudo-Huber score divergence (Luo et al. 2025)")
class DiffInstructStar(Objective):
    """DI* on prompts: a one-step generator (the ``few_step`` adapter's UNet), a frozen CFG teacher and an online
    fake-score network, updated in two phases per step, each with its own optimizer (di_star.md §2.4):

    1. ``fake``: L_ψ = ‖ε_ψ(x_t) − ε‖² on *detached* one-step samples (:func:`di_star_fake_score_loss`).
    2. ``generator``: L_G = −α·r(decode(x0)) + L_div (:func:`di_star_generator_loss`) with the teacher under CFG and
       ψ frozen; gradients flow through both networks' inputs (neither output is detached) and through the VAE
       decoder and the differentiable reward (the run's ``rewards`` composite, ``ctx.rewards``).

    Teacher: ``pipeline.reference: frozen_copy`` (a frozen copy of the base UNet) or, with LoRA, the generator UNet
    with adapters disabled (``adapter_off``). The fake network is a full trainable copy of the teacher. With
    ``generator_init`` the generator starts from other weights (DI*-SDXL: DMD2-SDXL-1step) while teacher and fake
    stay the base. Networks predicting v are converted to ε (ε = s·x_t + a·v) before the losses.

    Raises:
        ValueError: not a ``few_step`` adapter; ``adapter_off`` teacher with gradient checkpointing; a
            ``generator_init`` with LoRA; α > 0 with a non-differentiable reward (at the first generator step).
    """

    class Config(ObjectiveParams):
        alpha: float = Field(100.0, ge=0, description="reward scale α (README α_rev) [card]")
        guidance_scale: float = Field(7.5, ge=0, description="teacher CFG (README α_cfg) [card]")
        cfg_convention: Literal["omega", "omega_minus_one"] = Field(
            "omega", description="α_cfg = ω (diffusers) or ω − 1 [unknown → rec.] omega")
        cfg_placement: Literal["in", "out"] = Field("in", description="In-CFG (best in README) | Out-CFG ablation [card]")
        distance: Literal["pseudo_huber", "l2"] = Field("pseudo_huber", description="[2nd] pseudo-Huber; l2 = SiD")
        units: Literal["epsilon", "score"] = Field("epsilon", description="divergence units [unknown → rec.] epsilon")
        huber_c: float | None = Field(None, ge=0, description="c; None = 0.00054·sqrt(D) in ε units [unknown → rec.]")
        weight: float = Field(1.0, ge=0, description="w(t) (constant) [unknown → rec.] w_ε = 1")
        surrogate: Literal["sim", "exact"] = Field(
            "sim", description="card/SIM surrogate (default) or 'exact' (+d(y), exact gradient when teacher and "
                               "generator spreads differ) [recon]")
        detach_direction: bool = Field(False, description="ablation only (biased) [recon]")
        t_min: int = Field(20, ge=0, description="t ~ U{t_min..t_max} [unknown → rec.] SiD-LSG 20")
        t_max: int = Field(980, ge=0, description="[unknown → rec.] SiD-LSG 980")
        init_timestep: int = Field(399, ge=0, description="one-step input timestep [card]/[code] DMD2 399")
        fake_steps_per_generator_step: int = Field(
            1, ge=1, le=1, description="k_fake [unknown → rec.] 1 (SiD-LSG); >1 not supported by the one-optimizer-"
                                       "per-phase loop")
        learning_rate_generator: float | None = Field(None, gt=0, description="None = train.learning_rate")
        learning_rate_fake: float | None = Field(None, gt=0, description="None = train.learning_rate")
        generator_init: str | None = Field(None, description="generator weights (UNet folder / state dict); None = "
                                                             "the teacher's [card] DMD2-SDXL for DI*-SDXL")

        @model_validator(mode="after")
        def _check(self):
            if self.t_min > self.t_max:
                raise ValueError(f"t_min {self.t_min} > t_max {self.t_max}")
            if self.units == "score" and self.distance == "pseudo_huber" and self.huber_c is None:
                raise ValueError("units 'score' with pseudo_huber needs an explicit huber_c")
            return self

    needs_reference = True
    needs_reward = True
    data_kind = "prompts"
    #: how each default is known (written into the exported model card); see docs/objectives/di_star_r0.md
    provenance = {
        "alpha": "[card] verified (README α_rev = 100 on SDXL)", "guidance_scale": "[card] verified value 7.5 on SDXL",
        "cfg_convention": "[unknown → rec.]", "cfg_placement": "[card] In-CFG", "distance": "[2nd] pseudo-Huber",
        "units": "[unknown → rec.]", "huber_c": "[unknown → rec.]", "weight": "[unknown → rec.]",
        "surrogate": "[recon] card form; 'exact' adds +d(y)", "detach_direction": "[recon] ablation",
        "t_min": "[unknown → rec.] SiD-LSG", "t_max": "[unknown → rec.] SiD-LSG",
        "init_timestep": "[card]/[code] verified (DMD2 399)", "fake_steps_per_generator_step": "[unknown → rec.]",
        "learning_rate_generator": "[unknown → rec.]", "learning_rate_fake": "[unknown → rec.]",
        "generator_init": "[card] DMD2-SDXL-1step for DI*-SDXL",
    }

    def __init__(self, config, model):
        super().__init__(config, model)
        require_few_step(model, "di_star")
        c = config
        model.configure_few_step(1, c.init_timestep, 0.0)
        if c.t_max >= model.num_train_timesteps:
            raise ValueError(f"objective.t_max {c.t_max} must be < {model.num_train_timesteps}")
        if model.ref_unet is None:
            if getattr(model.unet, "is_gradient_checkpointing", False):
                raise ValueError("di_star with an adapter_off teacher cannot use gradient checkpointing (the "
                                 "recomputed generator forward would run with adapters off); use "
                                 "pipeline.reference: frozen_copy")
            fake = copy.deepcopy(model.unet)
            fake.unload_lora()
        else:
            fake = copy.deepcopy(model.ref_unet)
        if c.generator_init:
            if model.lora is not None:
                raise ValueError("objective.generator_init needs a full fine-tune (pipeline.lora: null)")
            load_generator_init(model.unet, c.generator_init)
        self.fake = fake.to(model.device, torch.float32).requires_grad_(True).train()
        self._fake_raw = self.fake
        self.rewards = None
        self._uncond = None

    # -- hooks ------------------------------------------------------------------------------------------------
    def build_data(self, ctx):
        """Prompt batches (:class:`~genalign.data.batches.PromptData`); keeps ``ctx.rewards`` for the reward term."""
        self.rewards = ctx.rewards
        return super().build_data(ctx)

    def trainable_modules(self) -> list[torch.nn.Module]:
        """[generator UNet, fake-score UNet] (checkpoint files trainable.safetensors, trainable_1.safetensors)."""
        return [self.model.unet, self._fake_raw]

    def use_prepared(self, modules: list[torch.nn.Module]) -> None:
        self.model._raw_unet = self.model.unet
        self.model.unet = modules[0]
        self.fake = modules[1]

    def phases(self) -> list[Phase]:
        """``fake`` (ψ, lr ``learning_rate_fake``) then ``generator`` (θ, lr ``learning_rate_generator``)."""
        c = self.config
        return [Phase("fake", [p for p in self._fake_raw.parameters() if p.requires_grad], self.fake_loss,
                      c.learning_rate_fake),
                Phase("generator", self.model.trainable_parameters(), self.generator_loss, c.learning_rate_generator)]

    def sample(self, prompts, vcfg, generators):
        """One-step samples (N, 3, H, W) in [0, 1], no CFG (the generator's own sampler)."""
        return self.model.sample(prompts, generator=generators, batch_size=len(prompts))

    # -- pieces -----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def teacher(self) -> Iterator[torch.nn.Module]:
        """The frozen teacher UNet, **with autograd enabled** (its parameters are frozen; inputs carry gradients)."""
        if self.model.ref_unet is not None:
            yield self.model.ref_unet
            return
        raw = getattr(self.model, "_raw_unet", self.model.unet)
        raw.disable_adapters()
        try:
            yield raw
        finally:
            raw.enable_adapters()

    def _eps(self, unet, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        pred = self.model.predict(x_t, t.to(x_t.device), cond, unet=unet)
        if self.model.prediction_type == "epsilon":
            return pred.float()
        return self.model.x0_eps(x_t, t, pred)[1]

    def _uncond_for(self, n: int) -> dict[str, Any]:
        if self._uncond is None:
            self._uncond = self.model.encode_uncond(1)
        return {k: (v.expand(n, *v.shape[1:]) if isinstance(v, torch.Tensor) else v) for k, v in self._uncond.items()}

    def _one_step(self, batch: dict[str, Any], generator) -> torch.Tensor:
        B = len(batch["prompts"])
        z = torch.randn(self.model.latent_shape(B), generator=generator).to(self.model.device)
        return self.model.generate_latents(z, batch["cond"], num_steps=1)[-1]

    def _diffusion_noise(self, x0: torch.Tensor, generator):
        c = self.config
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        t = sample_timesteps(x0.shape[0], c.t_min, c.t_max, generator=generator, device=x0.device)
        return noise, t

    def fake_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> LossOutput:
        """Phase 1: denoising loss of the fake network on detached one-step samples (no CFG)."""
        with torch.no_grad():
            x0 = self._one_step(batch, generator)
        noise, t = self._diffusion_noise(x0, generator)
        cond = batch["cond"]
        loss, m = di_star_fake_score_loss(x0, noise, t, self.model.alphas_cumprod,
                                          lambda x, tt: self._eps(self.fake, x, tt, cond))
        return LossOutput(loss, {k: float(v) for k, v in m.items() if k != "loss"})

    def generator_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> LossOutput:
        """Phase 2: −α·reward + score divergence to the CFG teacher, ψ frozen, gradient through both networks."""
        c = self.config
        cond = batch["cond"]
        B = len(batch["prompts"])
        omega = effective_guidance_scale(c.guidance_scale, c.cfg_convention)
        need_uncond = omega != 1.0
        with frozen_parameters(self._fake_raw.parameters()):
            x0 = self._one_step(batch, generator)
            noise, t = self._diffusion_noise(x0, generator)
            reward = None
            extra: dict[str, float] = {}
            if c.alpha > 0:
                if self.rewards is None:
                    raise ValueError("di_star: alpha > 0 needs the run's rewards (build_data(ctx) keeps ctx.rewards)")
                if not getattr(self.rewards, "differentiable", True):
                    raise ValueError("di_star: the reward must be differentiable (a rank-normalised or "
                                     "non-differentiable member was configured)")
                images = self.model.decode(x0)
                reward = self.rewards(images, batch["prompts"])
                extra = {k: float(v) for k, v in getattr(self.rewards, "last_metrics", {}).items()}
            with self.teacher() as teacher:
                def teacher_fn(x, tt):
                    if not need_uncond:
                        return None, self._eps(teacher, x, tt, cond)
                    # one forward over 2B rows [∅; c] (same numbers as two calls, fewer kernel launches)
                    both = {k: (torch.cat([u.to(cond[k].dtype), cond[k]]) if isinstance(cond.get(k), torch.Tensor)
                                else cond.get(k, u)) for k, u in self._uncond_for(B).items()}
                    eps_u, eps_c = self._eps(teacher, torch.cat([x, x]), torch.cat([tt, tt]), both).chunk(2)
                    return eps_u, eps_c

                loss, m = di_star_generator_loss(
                    x0, noise, t, self.model.alphas_cumprod, lambda x, tt: self._eps(self.fake, x, tt, cond),
                    teacher_fn, reward, alpha=c.alpha, guidance_scale=c.guidance_scale,
                    cfg_convention=c.cfg_convention, cfg_placement=c.cfg_placement, distance=c.distance,
                    units=c.units, huber_c=c.huber_c, weight=c.weight, detach_direction=c.detach_direction,
                    surrogate=c.surrogate)
        metrics = {k: float(v) for k, v in m.items() if k != "loss"}
        metrics.update(extra)
        return LossOutput(loss, metrics)
