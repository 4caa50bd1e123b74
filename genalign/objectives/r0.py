"""R0 / Reward-Instruct — regularised reward maximisation for few-step generators (Luo et al., arXiv 2503.13070, NeurIPS 2025).

R0 trains a few-step (K = 4) text-to-image generator, initialised from a pretrained diffusion model, purely by
maximising a weighted combination of normalised differentiable rewards on its own samples, back-propagating
through the K-step rollout, with no distillation loss and no images. Reward hacking is controlled by the
diffusion-style parameterisation, a weight regulariser towards the pretrained weights θ0 and random-η sampling;
R0+ also rewards every intermediate x̂0 (and adds a high-resolution guidance reward, modelled as one more reward
member)::

    R(x, c) = Σ_m w_m·(r_m(x, c) − μ_m)/(σ_m + 1e-6)          μ_m, σ_m batch statistics, detached
    L(θ)    = −Σ_k β_k·mean_b R(decode(x̂0^(k)), c) + λ·Σ_layers ‖θ − θ0‖²

There is no training code and the method section could not be read: **everything here is a reconstruction**
([recon] / [unknown → rec.], the fields of :class:`R0.Config`) built from the abstracts, figure captions and reviews — the rollout
form (flow: x_{t'} = (1 − t')x̂0 + t'(sqrt(1 − η²)ε̂ + ηξ); VP: DDIM(η)), η ~ U[0, 1] in training and 0 at
inference, batch standardisation of each reward, equal reward weights, λ = 1e-3 on the summed squared delta, the
step weights (R0: final step only; R0+: uniform 1/K), truncated back-propagation and the optional Langevin
perturbation of the v2 "reward-tilted parameter distribution" framing. Only K = 4 and the backbones are [paper].
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import torch
from pydantic import Field, model_validator

from genalign.objectives.base import LossOutput, Objective, ObjectiveParams, Phase
from genalign.pipelines.few_step import require_few_step
from genalign.pipelines.lora import lora_delta, lora_layers
from genalign.registry import objectives as OBJECTIVES
from genalign.rewards.normalize import zscore

__all__ = [
    "normalize_rewards",
    "composite_reward",
    "weight_regularizer",
    "delta_regularizer",
    "lora_delta_regularizer",
    "resolve_step_weights",
    "r0_generator_loss",
    "sample_eta",
    "langevin_perturb_",
    "R0",
]


def normalize_rewards(
    rewards: torch.Tensor,
    mode: str = "batch",
    stats: Optional[Tuple[float, float]] = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Normalise one reward member over the batch ([recon]).

    Args:
        rewards: (B,) raw reward r_m (higher is better), with graph.
        mode: "batch" (reconstruction/recommendation: (r − μ)/(σ + eps) with the batch mean and the population
            std, both detached, so ∂R_b/∂r_b = 1/(σ + eps) and there are no cross-sample terms:
            :func:`genalign.rewards.normalize.zscore` with ``detach_stats=True``); "fixed"
            ((r − μ)/(σ + eps) with ``stats = (μ, σ)`` given); "none" (identity).
        eps: reconstruction/recommendation 1e-6.

    Returns:
        (B,) fp32. With mode "batch", B = 1 gives 0 (and no gradient).

    Raises:
        ValueError: rewards not 1-D / empty, unknown mode, missing stats for "fixed", eps < 0.
    """
    if rewards.ndim != 1 or rewards.shape[0] == 0:
        raise ValueError(f"rewards must be a non-empty (B,) tensor, got {tuple(rewards.shape)}")
    if eps < 0:
        raise ValueError("eps must be >= 0")
    r = rewards.to(torch.float32)
    if mode == "none":
        return r
    if mode == "batch":
        return zscore(r, eps, detach_stats=True)
    if mode == "fixed":
        if stats is None:
            raise ValueError("mode='fixed' needs stats=(mean, std)")
        mu, sigma = float(stats[0]), float(stats[1])
        if sigma < 0:
            raise ValueError("fixed std must be >= 0")
        return (r - mu) / (sigma + eps)
    raise ValueError(f"mode must be 'batch', 'fixed' or 'none', got {mode!r}")


def composite_reward(
    rewards: Mapping[str, torch.Tensor],
    weights: Optional[Mapping[str, float]] = None,
    normalization: str = "batch",
    fixed_stats: Optional[Mapping[str, Tuple[float, float]]] = None,
    eps: float = 1e-6,
) -> Tuple[torch.Tensor, dict]:
    """Weighted normalised reward R_b = Σ_m w_m·normalise(r_m)_b ([recon], r0.md §2.2).

    Args:
        rewards: name → (B,) reward tensor (all the same B), e.g. {"hpsv2.1": …, "imagereward": …}.
        weights: name → w_m ≥ 0; None ⇒ equal weights 1/M (reconstruction/recommendation). Names missing from
            ``weights`` get 0; names in ``weights`` missing from ``rewards`` raise.
        normalization, eps: see :func:`normalize_rewards`; ``fixed_stats`` name → (μ, σ) for "fixed".

    Returns:
        ``(R, metrics)``: (B,) fp32 composite and ``reward/<name>`` (raw batch means) plus
        ``reward_norm/<name>`` (weighted normalised means).

    Raises:
        ValueError: empty rewards, mismatched shapes, negative weights, unknown names, or all weights 0
        (a configuration error, never a silent no-op).
    """
    if not rewards:
        raise ValueError("rewards must contain at least one member")
    shapes = {tuple(v.shape) for v in rewards.values()}
    if len(shapes) != 1:
        raise ValueError(f"all rewards must have the same (B,) shape, got {sorted(shapes)}")
    if weights is None:
        weights = {k: 1.0 / len(rewards) for k in rewards}
    unknown = set(weights) - set(rewards)
    if unknown:
        raise ValueError(f"weights given for unknown rewards: {sorted(unknown)}")
    if any(w < 0 for w in weights.values()):
        raise ValueError("reward weights must be >= 0")
    if sum(float(weights.get(k, 0.0)) for k in rewards) == 0.0:
        raise ValueError("all reward weights are 0: configuration error")
    total = None
    metrics = {}
    for name, r in rewards.items():
        w = float(weights.get(name, 0.0))
        stats = None if fixed_stats is None else fixed_stats.get(name)
        n = normalize_rewards(r, normalization, stats, eps)
        metrics[f"reward/{name}"] = r.detach().float().mean()
        metrics[f"reward_norm/{name}"] = (w * n).detach().mean()
        if w == 0.0:
            continue
        total = w * n if total is None else total + w * n
    return total, metrics


def weight_regularizer(
    params: Iterable[torch.Tensor], init_params: Iterable[torch.Tensor], lam: float = 1e-3
) -> torch.Tensor:
    """λ·Σ‖θ − θ0‖² over matching parameter tensors (θ0 a frozen snapshot; [unknown → rec.] λ = 1e-3).

    Gradient 2λ(θ − θ0); zero at θ = θ0. Raises ValueError on a length or shape mismatch or λ < 0.
    For LoRA use :func:`lora_delta_regularizer` (merged delta, not ‖A‖² + ‖B‖²).
    """
    if lam < 0:
        raise ValueError("lam must be >= 0")
    params, init_params = list(params), list(init_params)
    if len(params) != len(init_params) or not params:
        raise ValueError(f"need the same non-zero number of params and init params ({len(params)} vs {len(init_params)})")
    total = torch.zeros((), dtype=torch.float32, device=params[0].device)
    for p, p0 in zip(params, init_params):
        if p.shape != p0.shape:
            raise ValueError(f"parameter shape {tuple(p.shape)} != initial shape {tuple(p0.shape)}")
        total = total + ((p.to(torch.float32) - p0.detach().to(torch.float32)) ** 2).sum()
    return lam * total


def delta_regularizer(deltas: Iterable[torch.Tensor], lam: float = 1e-3) -> torch.Tensor:
    """λ·Σ‖ΔW‖²_F over weight deltas θ − θ0 (LoRA: each layer's merged ΔW, e.g.
    :func:`genalign.pipelines.lora.lora_delta`), fp32 with graph. Raises ValueError when empty or λ < 0."""
    if lam < 0:
        raise ValueError("lam must be >= 0")
    terms = [(d.to(torch.float32) ** 2).sum() for d in deltas]
    if not terms:
        raise ValueError("no weight deltas given (no LoRA layers?)")
    return lam * torch.stack(terms).sum()


def lora_delta_regularizer(
    lora_pairs: Iterable[Tuple[torch.Tensor, torch.Tensor, float]], lam: float = 1e-3
) -> torch.Tensor:
    """λ·Σ_layers ‖scale·B·A‖²_F for LoRA layers (θ − θ0 = merged delta; scale = lora_alpha / r) ([recon]).

    Args:
        lora_pairs: iterable of ``(A, B, scale)`` with A (r, in) and B (out, r) (PEFT ``lora_A``/``lora_B``
            weights; conv LoRA: flatten to 2-D first).
        lam: λ ≥ 0.

    Raises ValueError on incompatible shapes or λ < 0.
    """
    deltas = []
    for A, B, scale in lora_pairs:
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"LoRA shapes must be A (r, in), B (out, r); got {tuple(A.shape)}, {tuple(B.shape)}")
        deltas.append(float(scale) * (B.to(torch.float32) @ A.to(torch.float32)))
    return delta_regularizer(deltas, lam)


def resolve_step_weights(step_weights: Union[str, Sequence[float]], num_steps: int) -> List[float]:
    """β_k for k = 0..K−1: "final" (R0: [0, …, 0, 1]), "uniform" (R0+: 1/K each) or an explicit list ([recon])."""
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    if step_weights == "final":
        return [0.0] * (num_steps - 1) + [1.0]
    if step_weights == "uniform":
        return [1.0 / num_steps] * num_steps
    if isinstance(step_weights, str):
        raise ValueError(f"step_weights must be 'final', 'uniform' or a sequence, got {step_weights!r}")
    w = [float(x) for x in step_weights]
    if len(w) != num_steps or any(x < 0 for x in w) or sum(w) == 0:
        raise ValueError(f"explicit step_weights must be {num_steps} non-negative numbers, not all 0")
    return w


def r0_generator_loss(
    step_rewards: Sequence[Mapping[str, torch.Tensor]],
    *,
    reward_weights: Optional[Mapping[str, float]] = None,
    step_weights: Union[str, Sequence[float]] = "final",
    normalization: str = "batch",
    fixed_stats: Optional[Mapping[str, Tuple[float, float]]] = None,
    eps: float = 1e-6,
    params: Optional[Iterable[torch.Tensor]] = None,
    init_params: Optional[Iterable[torch.Tensor]] = None,
    weight_reg: float = 1e-3,
    regularizer: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, dict]:
    """R0 / R0+ generator loss L = −Σ_k β_k·mean_b R^(k)_b + λ·Σ‖θ − θ0‖² (reconstruction, r0.md §2.2).

    Args:
        step_rewards: length-K list; entry k maps reward name → (B,) differentiable reward of decode(x̂0^(k)).
            Entries whose β_k = 0 are not used (they may be empty dicts, e.g. plain R0 passes K − 1 empty dicts
            and the final rewards, or just a length-1 list with ``step_weights="final"``).
        reward_weights, normalization, fixed_stats, eps: see :func:`composite_reward` (reconstruction/recommendation
            defaults: equal weights, batch standardisation with detached statistics, eps 1e-6). Statistics are
            computed per step and per reward.
        step_weights: "final" (R0, default), "uniform" (R0+), or K explicit β_k (reconstruction/recommendation).
        params, init_params: trainable tensors and their θ0 snapshot for the weight regulariser (optional).
        weight_reg: λ (reconstruction/recommendation 1e-3 on the summed squared delta).
        regularizer: alternatively a precomputed regulariser (e.g. :func:`lora_delta_regularizer`), added as is.

    Returns:
        ``(loss, metrics)``; metrics ``loss``, ``reward_loss`` (−Σβ_k mean R), ``weight_reg`` (after λ),
        ``reward/<name>`` raw means at the final rewarded step, ``reward_step<k>`` composite means.

    Raises:
        ValueError: empty list, a weighted step without rewards, both ``params`` and ``regularizer`` given, and the
        errors of the helpers.
    """
    K = len(step_rewards)
    if K == 0:
        raise ValueError("step_rewards must contain at least one step")
    betas = resolve_step_weights(step_weights, K)
    if params is not None and regularizer is not None:
        raise ValueError("give either params/init_params or a precomputed regularizer, not both")
    reward_loss = None
    metrics: dict = {}
    for k, (beta, rewards) in enumerate(zip(betas, step_rewards)):
        if beta == 0.0:
            continue
        if not rewards:
            raise ValueError(f"step {k} has weight {beta} but no rewards")
        R, m = composite_reward(rewards, reward_weights, normalization, fixed_stats, eps)
        term = -beta * R.mean()
        reward_loss = term if reward_loss is None else reward_loss + term
        metrics[f"reward_step{k}"] = R.detach().mean()
        metrics.update(m)  # later steps overwrite: final rewarded step's raw means are logged
    loss = reward_loss
    reg = torch.zeros((), dtype=torch.float32, device=loss.device)
    if params is not None:
        if init_params is None:
            raise ValueError("init_params (θ0) are required with params")
        reg = weight_regularizer(params, init_params, weight_reg)
    elif regularizer is not None:
        reg = regularizer.to(torch.float32)
    loss = loss + reg
    metrics.update(loss=loss.detach(), reward_loss=reward_loss.detach(), weight_reg=reg.detach())
    return loss, metrics


def sample_eta(
    batch_size: int,
    eta_range: Tuple[float, float] = (0.0, 1.0),
    generator: Optional[torch.Generator] = None,
    device: Union[str, torch.device] = "cpu",
) -> torch.Tensor:
    """η ~ U[η_lo, η_hi] per sample, (B,) fp32 ([unknown → rec.] U[0, 1]); raises unless 0 ≤ η_lo ≤ η_hi ≤ 1."""
    lo, hi = float(eta_range[0]), float(eta_range[1])
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"need 0 <= eta_lo <= eta_hi <= 1, got {eta_range}")
    return (lo + (hi - lo) * torch.rand(batch_size, generator=generator)).to(device)


@torch.no_grad()
def langevin_perturb_(
    params: Iterable[torch.Tensor], lr: float, tau: float, generator: Optional[torch.Generator] = None
) -> None:
    """In place θ ← θ + sqrt(2·lr·τ)·ξ after an optimizer step ([recon]; v2 framing, exact only for plain SGD)."""
    if lr < 0 or tau < 0:
        raise ValueError("lr and tau must be >= 0")
    if tau == 0:
        return
    scale = math.sqrt(2.0 * lr * tau)
    for p in params:
        p.add_(scale * torch.randn(p.shape, generator=generator).to(p.device, p.dtype))


# --------------------------------------------------------------------------------------------------------------
# The trainer objective
# --------------------------------------------------------------------------------------------------------------


@OBJECTIVES.register("r0", "R0 / Reward-Instruct: few-step generator by regularised reward maximisation (Luo et al. 2025)")
class R0(Objective):
    """R0 on prompts: a K-step generator (the ``few_step`` adapter's UNet) rolled out from noise with random-η
    DDIM(η) transitions, trained on −Σ_k β_k·mean R(decode(x̂0^(k))) + λ·‖θ − θ0‖² (:func:`r0_generator_loss`).

    R is the composite of the run's ``rewards`` list (``ctx.rewards`` members, scored raw and standardised here
    per member with detached batch statistics; weights = the list's ``weight`` unless ``reward_weights`` is set;
    the list's own ``normalize`` setting is not used). The regulariser is Σ‖θ − θ0‖² over the full UNet
    (θ0 = the base weights, snapshot at construction) or, with LoRA, the merged delta Σ‖scale·B·A‖²_F.
    Everything is a reconstruction (r0.md): see the tags of :class:`R0.Config` and docs/objectives/di_star_r0.md.

    Raises:
        ValueError: not a ``few_step`` adapter, a non-differentiable reward, or weights that are all 0.
    """

    class Config(ObjectiveParams):
        num_steps: int = Field(4, ge=1, description="K [paper] Table 1")
        first_timestep: int = Field(999, ge=0, description="t₀; steps t₀ − k(t₀+1)/K = [999, 749, 499, 249] "
                                                           "[unknown → rec.] (DMD2 4-step / DDIM trailing)")
        eta_range: Tuple[float, float] = Field((0.0, 1.0), description="training η ~ U[lo, hi] [unknown → rec.]")
        eta_inference: float = Field(0.0, ge=0, le=1, description="[unknown → rec.] 0 (deterministic DDIM)")
        reward_weights: Optional[Dict[str, float]] = Field(
            None, description="per member; None = the rewards list's weights [unknown → rec.] equal")
        normalization: Literal["batch", "fixed", "none"] = Field("batch", description="[recon] batch standardisation")
        fixed_stats: Optional[Dict[str, Tuple[float, float]]] = None
        normalization_eps: float = Field(1e-6, ge=0, description="[recon]")
        weight_reg: float = Field(1e-3, ge=0, description="λ on Σ‖θ − θ0‖² [unknown → rec.]")
        step_weights: Union[Literal["final", "uniform"], List[float]] = Field(
            "final", description="final = R0, uniform = R0+ intermediate supervision [recon]")
        backprop_steps: Optional[int] = Field(None, ge=1, description="None = through the whole chain [recon]")
        learning_rate: Optional[float] = Field(None, gt=0, description="None = train.learning_rate")

        @model_validator(mode="after")
        def _check(self):
            lo, hi = self.eta_range
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"eta_range must satisfy 0 <= lo <= hi <= 1, got {self.eta_range}")
            if self.backprop_steps is not None and self.backprop_steps > self.num_steps:
                raise ValueError("backprop_steps must be <= num_steps")
            resolve_step_weights(self.step_weights, self.num_steps)
            if self.normalization == "fixed" and not self.fixed_stats:
                raise ValueError("normalization 'fixed' needs fixed_stats {reward: [mean, std]}")
            return self

    needs_reward = True
    data_kind = "prompts"
    #: how each default is known (written into the exported model card); see docs/objectives/di_star_r0.md
    provenance = {
        "num_steps": "[paper] verified (K = 4)", "first_timestep": "[unknown → rec.]", "eta_range": "[unknown → rec.]",
        "eta_inference": "[unknown → rec.]", "reward_weights": "[unknown → rec.] equal",
        "normalization": "[recon]", "normalization_eps": "[recon]", "fixed_stats": "[recon]",
        "weight_reg": "[unknown → rec.]", "step_weights": "[recon]", "backprop_steps": "[recon]",
        "learning_rate": "[unknown → rec.]",
    }

    def __init__(self, config, model):
        super().__init__(config, model)
        require_few_step(model, "r0")
        model.configure_few_step(config.num_steps, config.first_timestep, config.eta_inference)
        self.rewards = None
        # θ0: the base weights (taken before any checkpoint is loaded, so a resumed run anchors to the same θ0).
        self.theta0 = None
        if model.lora is None:
            self.theta0 = [p.detach().clone() for p in model.trainable_parameters()]

    def build_data(self, ctx):
        """Prompt batches; keeps ``ctx.rewards`` (the run's composite) for the reward term."""
        self.rewards = ctx.rewards
        return super().build_data(ctx)

    def phases(self) -> list[Phase]:
        """One phase over the generator's trainable parameters (lr ``learning_rate``)."""
        return [Phase("main", self.model.trainable_parameters(), self.loss, self.config.learning_rate)]

    def sample(self, prompts, vcfg, generators):
        """K-step samples (N, 3, H, W) in [0, 1] at η = ``eta_inference`` (the exported sampler)."""
        return self.model.sample(prompts, generator=generators, batch_size=len(prompts))

    def reward_weights(self) -> Dict[str, float]:
        """Member weights: ``reward_weights`` or the run's rewards list (names as ``ctx.rewards.names``)."""
        if self.config.reward_weights is not None:
            return dict(self.config.reward_weights)
        return dict(zip(self.rewards.names, self.rewards.weights))

    def regularizer(self) -> torch.Tensor:
        """λ·Σ‖θ − θ0‖² (full) or λ·Σ‖scale·B·A‖²_F (LoRA merged delta), fp32 scalar with graph."""
        lam = self.config.weight_reg
        if lam == 0:
            return torch.zeros((), device=self.model.device)
        if self.theta0 is not None:
            return weight_regularizer(self.model.trainable_parameters(), self.theta0, lam)
        return delta_regularizer([lora_delta(layer) for _, layer in lora_layers(self.model.denoiser())], lam)

    def loss(self, batch: Dict[str, Any], generator: Optional[torch.Generator] = None) -> LossOutput:
        """Random-η K-step rollout with graph → rewards of the weighted steps → R0 loss (:func:`r0_generator_loss`)."""
        c = self.config
        if self.rewards is None:
            raise ValueError("r0 needs the run's rewards (build_data(ctx) keeps ctx.rewards)")
        if not getattr(self.rewards, "differentiable", True):
            raise ValueError("r0: every reward member must be differentiable (and not rank-normalised)")
        B = len(batch["prompts"])
        z = torch.randn(self.model.latent_shape(B), generator=generator).to(self.model.device)
        eta = sample_eta(B, tuple(c.eta_range), generator=generator, device=self.model.device)
        outs = self.model.generate_latents(z, batch["cond"], eta=eta, generator=generator,
                                           backprop_steps=c.backprop_steps)
        betas = resolve_step_weights(c.step_weights, len(outs))
        step_rewards = []
        for beta, x0 in zip(betas, outs):
            if beta == 0.0:
                step_rewards.append({})
                continue
            comps = self.rewards.components(self.model.decode(x0), batch["prompts"])
            step_rewards.append({k: v.float().reshape(-1) for k, v in comps.items()})
        loss, m = r0_generator_loss(step_rewards, reward_weights=self.reward_weights(), step_weights=c.step_weights,
                                    normalization=c.normalization, fixed_stats=c.fixed_stats,
                                    eps=c.normalization_eps, regularizer=self.regularizer())
        metrics = {k: float(v) for k, v in m.items() if k != "loss"}
        metrics["eta_mean"] = float(eta.mean())
        return LossOutput(loss, metrics)
