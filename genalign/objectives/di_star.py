"""Diff-Instruct* (DI*) — score-based RLHF for one-step generators (Luo et al., ICML 2025, arXiv 2410.20898).

DI* post-trains a one-step generator g_θ to maximise an explicit reward while staying close to a CFG-guided
frozen teacher under a *score-based* divergence (pseudo-Huber distance between the generator's marginal score and
the teacher's score, integrated over diffusion time)::

    min_θ  E[−α·r(decode(g_θ(z, c)), c)] + ∫ w(t) E_{x_t~p_θ,t}[ d(s_{p_θ,t}(x_t) − s^ω_ref,t(x_t)) ] dt,
    d(y) = sqrt(‖y‖² + c²) − c.

The surrogate L_div = −w(t)·⟨d'(y), s_ψ(x_t) − ∇log q_t(x_t|x0)⟩, y = s_ψ − s_ref, uses an online fake-score
network ψ trained by denoising score matching on *detached* generator samples ([code] SiD-LSG, DMD2). The generator
gradient flows through the input Jacobians of both frozen networks (also inside d'(y)): detaching their outputs
makes it exactly zero; detaching only d'(y) (the ``detach_direction`` ablation) is biased. No official training
code exists: form and sign follow the card ([recon], checked on analytic Gaussians in the tests); the L2 case is
SiD-LSG's generator loss with α = 1 [code]. [unknown → rec.] values are config fields: ε units with w_ε = 1 and
c_ε = 0.00054·sqrt(D) (card §2.5), ω vs ω − 1, t ~ randint(20, 980) (exclusive top as SiD-LSG [code]).

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

import contextlib
import copy
import math
from typing import Any, Callable, Iterator, Literal, Optional, Tuple, Union

import torch
from pydantic import Field, model_validator

from genalign.objectives.base import LossOutput, Objective, ObjectiveParams, Phase
from genalign.pipelines.few_step import load_unet_weights, require_few_step
from genalign.pipelines.rollout import noisy_sample
from genalign.pipelines.schedule import alpha_bar_at
from genalign.registry import objectives as OBJECTIVES

__all__ = ["teacher_cfg", "effective_guidance_scale", "default_huber_c", "di_star_divergence", "di_star_generator_loss",
           "di_star_fake_score_loss", "sample_timesteps", "frozen_parameters", "DiffInstructStar"]

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TeacherFn = Callable[[torch.Tensor, torch.Tensor], Tuple[Optional[torch.Tensor], torch.Tensor]]


def effective_guidance_scale(guidance_scale: float, convention: str = "omega") -> float:
    """ω in the diffusers convention: ``"omega"`` ⇒ ω = guidance_scale; ``"omega_minus_one"`` ⇒ ω = scale + 1.

    The README's α_cfg = 7.5 may be either ([unknown → rec.]: "omega"). Raises ValueError on an unknown convention.
    """
    if convention == "omega":
        return float(guidance_scale)
    if convention == "omega_minus_one":
        return float(guidance_scale) + 1.0
    raise ValueError(f"cfg_convention must be 'omega' or 'omega_minus_one', got {convention!r}")


def teacher_cfg(eps_uncond: Optional[torch.Tensor], eps_cond: torch.Tensor, guidance_scale: float,
                convention: str = "omega") -> torch.Tensor:
    """Classifier-free guided teacher prediction ε^ω = ε_∅ + ω·(ε_c − ε_∅), fp32; ``eps_uncond`` / ``eps_cond``
    (B, ...), the former may be None when ω = 1 (:func:`effective_guidance_scale` gives ω).

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


def sample_timesteps(batch_size: int, t_min: int = 20, t_max: int = 980, generator: Optional[torch.Generator] = None,
                     device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """t ~ randint(t_min, t_max): uniform on {t_min, …, t_max − 1} (exclusive top), (B,) long.

    [code] SiD-LSG ``training/sid_training_loop.py`` draws ``torch.randint(tmin, tmax, ...)`` for both the fake-score
    and the generator losses; the values 20 / 980 are [unknown → rec.] (SiD-LSG's tmin / tmax). Raises ValueError
    unless 0 ≤ t_min < t_max.
    """
    if not 0 <= t_min < t_max:
        raise ValueError(f"need 0 <= t_min < t_max (exclusive top), got {t_min}, {t_max}")
    return torch.randint(t_min, t_max, (batch_size,), generator=generator).to(device)


def _weights(weight: Union[float, torch.Tensor, None], B: int, device) -> torch.Tensor:
    """w(t) as (B,) fp32 (None ⇒ 1); ValueError unless a scalar or (B,)."""
    w = torch.as_tensor(1.0 if weight is None else weight, dtype=torch.float32, device=device)
    w = w.expand(B) if w.ndim == 0 else w
    if w.shape != (B,):
        raise ValueError(f"weight must be a scalar or ({B},), got {tuple(w.shape)}")
    return w


def _alpha_bar(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, B: int) -> torch.Tensor:
    """ᾱ_t (B,) fp32 for integer timesteps (B,); ValueError on a bad shape or a timestep outside the schedule."""
    if alphas_cumprod.ndim != 1:
        raise ValueError("alphas_cumprod must be a 1-D tensor (T,)")
    if timesteps.ndim != 1 or timesteps.shape[0] != B:
        raise ValueError(f"timesteps must have shape ({B},), got {tuple(timesteps.shape)}")
    return alpha_bar_at(alphas_cumprod, timesteps)


def di_star_divergence(
    eps_fake: torch.Tensor, eps_ref: torch.Tensor, noise: torch.Tensor, *, sigma: Optional[torch.Tensor] = None,
    distance: str = "pseudo_huber", units: str = "epsilon", huber_c: Optional[float] = None,
    weight: Union[float, torch.Tensor, None] = None, detach_direction: bool = False, surrogate: str = "sim",
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
        surrogate: "sim" (default, the card's / SIM's form; L2 case = SiD α = 1) or "exact" (adds ``+w·d(y(x_t))``
            through x_t: the exact gradient in general; L2 case = SiD α = 0.5). See the module docstring.

    Returns (B,) fp32 per-sample surrogate ("sim": only its gradient is meaningful; "exact": its expectation at
    ψ = θ also equals the divergence). Raises ValueError on shape mismatches, unknown distance/units, missing
    sigma or c for score units, c < 0.

    Source: di_star.md §2.2 (surrogate, sign: y = fake − ref with a leading minus) and §2.5 (ε units).
    """
    if not (eps_fake.shape == eps_ref.shape == noise.shape) or eps_fake.ndim < 2:
        raise ValueError(f"eps_fake {tuple(eps_fake.shape)}, eps_ref {tuple(eps_ref.shape)} and noise "
                         f"{tuple(noise.shape)} must have one (B, ...) shape with at least one non-batch dim")
    for name, value, allowed in (("distance", distance, ("pseudo_huber", "l2")), ("units", units, ("epsilon", "score")),
                                 ("surrogate", surrogate, ("sim", "exact"))):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    B = eps_fake.shape[0]
    D = eps_fake[0].numel()
    ef = eps_fake.to(torch.float32).flatten(1)
    u = ef - eps_ref.to(torch.float32).flatten(1)  # ε_ψ − ε^ω
    v = ef - noise.to(torch.float32).flatten(1)  # ε_ψ − ε
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
    w = _weights(weight, B, ef.device)
    out = -w * (d_prime * grad_q).sum(dim=1)
    if surrogate == "exact":
        out = out + w * d_value
    return out


def di_star_generator_loss(
    x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
    fake_eps_fn: EpsFn, teacher_eps_fn: TeacherFn, reward: Optional[torch.Tensor] = None, *,
    alpha: float = 100.0, guidance_scale: float = 7.5, cfg_convention: str = "omega", cfg_placement: str = "in",
    distance: str = "pseudo_huber", units: str = "epsilon", huber_c: Optional[float] = None,
    weight: Union[float, torch.Tensor, None] = None, detach_direction: bool = False, surrogate: str = "sim",
) -> Tuple[torch.Tensor, dict]:
    """DI* generator loss L_G = mean_b[−α·r_b + L_div,b (+ L_cfg,b for Out-CFG)].

    Args:
        x0: (B, ...) generator output g_θ(z, c) **with graph** (latent space).
        noise: (B, ...) ε ~ N(0, I) for the diffusion of x0 (constant).
        timesteps: (B,) integer t (recommend :func:`sample_timesteps`, U{20..979}).
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

    Returns ``(loss, metrics)``: ``loss``, ``div_loss``, ``cfg_loss``, ``reward`` (mean r), ``reward_term``,
    ``u_norm`` (mean ‖ε_ψ − ε^ω‖), ``fake_dsm`` (mean per-element ‖ε_ψ − ε‖²), ``huber_c``.
    Raises ValueError on shape problems, α < 0, unknown placement/convention, a reward of the wrong shape.

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
    ab = _alpha_bar(timesteps, alphas_cumprod, B).to(x0.device)
    s = (1 - ab).sqrt()
    x_t = noisy_sample(x0, noise, ab)

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
        w = _weights(weight, B, x0.device)
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
        metrics = {"loss": loss.detach(), "div_loss": div_loss.detach(), "cfg_loss": cfg_loss.detach(),
                   "reward": reward_mean.detach(), "reward_term": (-alpha * reward_mean).detach(),
                   "u_norm": (ef - eps_ref.detach()).flatten(1).norm(dim=1).mean(),
                   "fake_dsm": ((ef - noise.to(torch.float32)) ** 2).mean(),
                   "huber_c": torch.tensor(float(c) if c is not None else float("nan"))}
    return loss, metrics


def di_star_fake_score_loss(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                            alphas_cumprod: torch.Tensor, fake_eps_fn: EpsFn) -> Tuple[torch.Tensor, dict]:
    """Fake-score ("assistant") denoising loss L_ψ = mean_b mean_elements ‖ε_ψ(x_t, t, c) − ε‖², no CFG.

    x_t = a_t·sg[x0] + s_t·ε: ``x0`` (B, ...) is detached here, so generator parameters get no gradient. ``noise``
    (B, ...) ε; ``timesteps`` (B,); ``alphas_cumprod`` (T,); ``fake_eps_fn``: ``(x_t, t) -> ε_ψ`` (trainable).

    Returns ``(loss, {"loss", "fake_loss"})``. Raises ValueError on shape mismatch.

    Source: SiD-LSG ``training/sid_training_loop.py`` L439–443; DMD2 ``main/sd_guidance.py`` ([code]).
    """
    if x0.shape != noise.shape or x0.ndim < 2:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must be equal (B, ...) shapes")
    ab = _alpha_bar(timesteps, alphas_cumprod, x0.shape[0]).to(x0.device)
    x_t = noisy_sample(x0.detach(), noise, ab)
    eps = fake_eps_fn(x_t, timesteps)
    if eps.shape != x0.shape:
        raise ValueError(f"fake prediction {tuple(eps.shape)} must match x0 {tuple(x0.shape)}")
    per_sample = ((eps.to(torch.float32) - noise.to(torch.float32)) ** 2).flatten(1).mean(dim=1)
    loss = per_sample.mean()
    return loss, {"loss": loss.detach(), "fake_loss": loss.detach()}


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


@OBJECTIVES.register("di_star", "Diff-Instruct*: one-step generator, reward + pseudo-Huber score divergence (Luo et al. 2025)")
class DiffInstructStar(Objective):
    """DI* on prompts: a one-step generator (the ``few_step`` adapter's UNet), a frozen CFG teacher and an online
    fake-score network, updated in two phases per step, each with its own optimizer (di_star.md §2.4):

    1. ``fake``: L_ψ = ‖ε_ψ(x_t) − ε‖² on *detached* one-step samples (:func:`di_star_fake_score_loss`).
    2. ``generator``: L_G = −α·r(decode(x0)) + L_div (:func:`di_star_generator_loss`) with the teacher under CFG and
       ψ frozen; gradients flow through both networks' inputs (neither output is detached) and through the VAE
       decoder and the differentiable reward (the run's ``rewards`` composite, ``ctx.rewards``).

    Teacher: ``pipeline.reference: frozen_copy`` or, with LoRA, the generator with adapters disabled
    (``adapter_off``); the fake network is a full trainable copy of the teacher; ``generator_init`` starts the
    generator from other weights (DI*-SDXL: DMD2-SDXL-1step). v-predicting networks are converted to ε.

    Raises:
        ValueError: not a ``few_step`` adapter; ``adapter_off`` teacher with gradient checkpointing; a
            ``generator_init`` with LoRA; α > 0 with a non-differentiable reward (at the first generator step).
    """

    class Config(ObjectiveParams):
        alpha: float = Field(100.0, ge=0, description="[card] verified (README α_rev = 100 on SDXL); reward scale α")
        guidance_scale: float = Field(7.5, ge=0, description="[card] verified value 7.5 on SDXL; teacher CFG α_cfg")
        cfg_convention: Literal["omega", "omega_minus_one"] = Field("omega", description="[unknown → rec.] α_cfg = ω")
        cfg_placement: Literal["in", "out"] = Field("in", description="[card] In-CFG (best); out = Out-CFG ablation")
        distance: Literal["pseudo_huber", "l2"] = Field("pseudo_huber", description="[2nd] pseudo-Huber; l2 = SiD")
        units: Literal["epsilon", "score"] = Field("epsilon", description="[unknown → rec.] ε units (card §2.5)")
        huber_c: float | None = Field(None, ge=0, description="[unknown → rec.] None = c_ε = 0.00054·sqrt(D)")
        weight: float = Field(1.0, ge=0, description="[unknown → rec.] constant w(t) = w_ε = 1")
        surrogate: Literal["sim", "exact"] = Field("sim", description="[recon] card form; 'exact' adds +d(y)")
        detach_direction: bool = Field(False, description="[recon] ablation only (biased gradient)")
        t_min: int = Field(20, ge=0, description="[unknown → rec.] SiD-LSG tmin; t ~ randint(t_min, t_max) [code]")
        t_max: int = Field(980, ge=1, description="[unknown → rec.] SiD-LSG tmax; exclusive top as SiD-LSG [code]")
        init_timestep: int = Field(399, ge=0, description="[card]/[code] verified (DMD2 399); one-step input t")
        fake_steps_per_generator_step: int = Field(1, ge=1, le=1, description="[unknown → rec.] k_fake 1 (SiD-LSG)")
        learning_rate_generator: float | None = Field(None, gt=0, description="[unknown → rec.] None = train lr")
        learning_rate_fake: float | None = Field(None, gt=0, description="[unknown → rec.] None = train lr")
        generator_init: str | None = Field(None, description="[card] DMD2-SDXL-1step for DI*-SDXL; generator weights "
                                                             "(UNet folder / state dict), None = the teacher's")

        @model_validator(mode="after")
        def _check(self):
            if self.t_min >= self.t_max:
                raise ValueError(f"t_min {self.t_min} must be < t_max {self.t_max} (t ~ randint(t_min, t_max))")
            if self.units == "score" and self.distance == "pseudo_huber" and self.huber_c is None:
                raise ValueError("units 'score' with pseudo_huber needs an explicit huber_c")
            return self

    needs_reference = True
    needs_reward = True
    data_kind = "prompts"
    #: how each default is known (the tags of the field descriptions; written into the exported model card)
    provenance = {k: f.description for k, f in Config.model_fields.items()}

    def __init__(self, config, model):
        super().__init__(config, model)
        require_few_step(model, "di_star")
        c = config
        model.configure_few_step(1, c.init_timestep, 0.0)
        if c.t_max > model.num_train_timesteps:
            raise ValueError(f"objective.t_max {c.t_max} must be <= {model.num_train_timesteps} (exclusive top)")
        if model.ref_unet is None:
            if getattr(model.denoiser(), "is_gradient_checkpointing", False):
                raise ValueError("di_star with an adapter_off teacher cannot use gradient checkpointing (the "
                                 "recomputed generator forward would run with adapters off); use "
                                 "pipeline.reference: frozen_copy")
            fake = copy.deepcopy(model.denoiser())
            fake.unload_lora()
        else:
            fake = copy.deepcopy(model.ref_unet)
        if c.generator_init:
            if model.lora is not None:
                raise ValueError("objective.generator_init needs a full fine-tune (pipeline.lora: null)")
            load_unet_weights(model.denoiser(), c.generator_init)
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
        return [self.model.denoiser(), self._fake_raw]

    def use_prepared(self, modules: list[torch.nn.Module]) -> None:
        """Generator forwards through the wrapped generator (the adapter's verb), fake forwards through ``modules[1]``."""
        self.model.use_prepared(modules[0])
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
    def _uncond_for(self, n: int) -> dict[str, Any]:
        if self._uncond is None:
            self._uncond = self.model.encode_uncond(1)
        return {k: (v.expand(n, *v.shape[1:]) if isinstance(v, torch.Tensor) else v) for k, v in self._uncond.items()}

    def _one_step(self, batch: dict[str, Any], generator) -> torch.Tensor:
        z = self.model.initial_noise(len(batch["prompts"]), generator)
        return self.model.generate_latents(z, batch["cond"], num_steps=1)[-1]

    def _diffusion_noise(self, x0: torch.Tensor, generator):
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        t = sample_timesteps(x0.shape[0], self.config.t_min, self.config.t_max, generator=generator, device=x0.device)
        return noise, t

    def fake_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> LossOutput:
        """Phase 1: denoising loss of the fake network on detached one-step samples (no CFG)."""
        with torch.no_grad():
            x0 = self._one_step(batch, generator)
        noise, t = self._diffusion_noise(x0, generator)
        cond = batch["cond"]
        loss, m = di_star_fake_score_loss(x0, noise, t, self.model.alphas_cumprod,
                                          lambda x, tt: self.model.predict_eps(x, tt, cond, unet=self.fake))
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
            with self.model.reference_with_grad() as teacher:
                def teacher_fn(x, tt):
                    if not need_uncond:
                        return None, self.model.predict_eps(x, tt, cond, unet=teacher)
                    return self.model.predict_eps_cfg_pair(x, tt, cond, self._uncond_for(B), unet=teacher)

                loss, m = di_star_generator_loss(
                    x0, noise, t, self.model.alphas_cumprod,
                    lambda x, tt: self.model.predict_eps(x, tt, cond, unet=self.fake), teacher_fn, reward,
                    alpha=c.alpha, guidance_scale=c.guidance_scale, cfg_convention=c.cfg_convention,
                    cfg_placement=c.cfg_placement, distance=c.distance, units=c.units, huber_c=c.huber_c,
                    weight=c.weight, detach_direction=c.detach_direction, surrogate=c.surrogate)
        metrics = {k: float(v) for k, v in m.items() if k != "loss"}
        metrics.update(extra)
        return LossOutput(loss, metrics)
