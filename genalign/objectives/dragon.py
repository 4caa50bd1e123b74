"""DRAGON — Distributional Rewards Optimize Diffusion Generative Models (Bai et al., TMLR 2025, arXiv 2504.15217).

DRAGON is an on-policy loop: each round the current model generates, the generations are scored with a reward
of any granularity (instance r(x), instance-to-distribution such as per-song FAD, or distribution-level such as
dataset FAD / Vendi), split into a positive set D+ and a negative set D−, and the model is updated with a
contrastive diffusion loss that pulls towards D+ and away from D−. The two plug-in losses are Diffusion-DPO
(paired, :func:`dragon_dpo_loss`) and Diffusion-KTO (unpaired)::

    g_i = R_i − L_i,  z_ref = sg[max(0, mean_i g_i)],  h_i = σ(s_i·β·(g_i − z_ref)),  L = mean_i λ_{y_i}(1 − h_i)

Verified: the Diffusion-KTO loss ([code] ``jacklishufan/diffusion-kto@226bbd0`` ``train_kto_sd_v1.5.py``,
``--halo sigmoid``: β = 1000, λ_D = λ_U = 1, z_ref clamped at 0, detached and all-reduced) and the Diffusion-DPO
loss ([code], see diffusion_dpo.md). DRAGON itself has no official code and its method section could not be
read, so the demonstration builders (:mod:`genalign.evaluation.demonstrations`), the choice of loss per reward
kind, β for audio latents, round sizes and the win-rate definition (:mod:`genalign.evaluation.winrate`) are
reconstructions / recommendations ([recon] / [unknown → rec.]) and are exposed as options. Rewards only select
demonstrations; they are never differentiated. Reward terms: :mod:`genalign.rewards.terms`; round caching:
:mod:`genalign.objectives.rounds`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from pydantic import Field

from genalign.config import RewardItem
from genalign.data.exemplars import load_exemplars
from genalign.data.prompts import load_prompts
from genalign.evaluation.demonstrations import split_round
from genalign.evaluation.winrate import term_win_rates
from genalign.objectives.base import LossOutput, Objective, ObjectiveParams, StepResult, TrainContext
from genalign.objectives.rounds import RoundClock, fingerprint, load_or_build_round, optimizer_steps_per_pass
from genalign.pipelines.base import cond_to, index_cond
from genalign.pipelines.denoising import convert_beta, paired_denoising_losses, shared_noise_losses
from genalign.pipelines.sampling import encode_prompts, sample_latents
from genalign.registry import objectives as _OBJECTIVES
from genalign.rewards.terms import CompositeTerm, RewardTerm, evaluate_terms

__all__ = ["diffusion_kto_loss", "dragon_dpo_loss", "DragonRewardTerm", "DragonData", "DRAGON"]

logger = logging.getLogger(__name__)


def diffusion_kto_loss(
    model_losses: torch.Tensor,
    ref_losses: torch.Tensor,
    labels: torch.Tensor,
    beta: float = 1000.0,
    lambda_desirable: float = 1.0,
    lambda_undesirable: float = 1.0,
    *,
    kl: Optional[Union[torch.Tensor, float]] = None,
    reduce_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> Tuple[torch.Tensor, dict]:
    """Diffusion-KTO loss (sigmoid value function), as plugged into DRAGON's unpaired branch.

    Args:
        model_losses: (B,) per-sample denoising MSE L_i of the trained model, mean over all latent elements
            (official convention), each sample with its own (t, ε). Carries the graph.
        ref_losses: (B,) reference MSE R_i at the same (x_t, t, ε); treated as constants (detached here).
        labels: (B,) 1/True = desirable (D+), 0/False = undesirable (D−). Any other value raises.
        beta: β > 0 (upstream 1000 for mean-reduced image latents; [unknown → rec.] for DRAGON's audio latents).
        lambda_desirable, lambda_undesirable: λ_D, λ_U ≥ 0 (upstream 1, [code]).
        kl: optional reference point z_ref used *verbatim* (detached; e.g. a globally all-reduced value).
        reduce_fn: optional callable applied to the local mean of g before clamping (e.g. an all-reduce mean
            across ranks, as upstream ``accelerator.reduce(kl, 'mean')``). Ignored when ``kl`` is given.

    Returns:
        ``(loss, metrics)``: loss = mean_i λ_{y_i}·(1 − σ(s_i·β·(g_i − z_ref))) with g = R − L, s = ±1, and
        metrics ``kl`` (z_ref), ``implicit_acc`` (fraction with s·β·(g − z_ref) > 0), ``implicit_reward`` (mean g),
        ``raw_model_loss``, ``raw_ref_loss``, ``n_desirable``, ``n_undesirable``.

    Raises:
        ValueError: shapes differ or are not 1-D, labels not in {0, 1}, β ≤ 0, negative λ.

    Source: Li et al., Diffusion-KTO (NeurIPS 2024); ``jacklishufan/diffusion-kto@226bbd0``
    ``train_kto_sd_v1.5.py`` loss block (g_term, kl.clamp(min=0).detach(), label_sgn, w_y·(1 − h)); dragon.md §2.2.
    """
    for name, x in (("model_losses", model_losses), ("ref_losses", ref_losses), ("labels", labels)):
        if not isinstance(x, torch.Tensor) or x.ndim != 1 or x.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty 1-D tensor, got {getattr(x, 'shape', type(x))}")
    if model_losses.shape != ref_losses.shape or labels.shape != model_losses.shape:
        raise ValueError(
            f"shape mismatch: model_losses {tuple(model_losses.shape)}, ref_losses {tuple(ref_losses.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if lambda_desirable < 0 or lambda_undesirable < 0:
        raise ValueError("lambda_desirable and lambda_undesirable must be >= 0")
    lab = labels.to(torch.float32)
    if not bool(((lab == 0) | (lab == 1)).all()):
        raise ValueError("labels must be 0 (undesirable) or 1 (desirable)")
    desirable = lab == 1

    L = model_losses.to(torch.float32)
    R = ref_losses.detach().to(torch.float32)
    g = R - L
    if kl is None:
        z = g.detach().mean()
        if reduce_fn is not None:
            z = reduce_fn(z)
        z_ref = z.clamp(min=0).detach()
    else:
        z_ref = torch.as_tensor(kl, dtype=torch.float32, device=g.device).detach()
    sign = 2.0 * lab - 1.0
    logits = sign * beta * (g - z_ref)
    h = torch.sigmoid(logits)
    w = torch.where(desirable, torch.full_like(g, float(lambda_desirable)), torch.full_like(g, float(lambda_undesirable)))
    loss = (w * (1.0 - h)).mean()
    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "kl": z_ref.detach(),
            "implicit_acc": (logits > 0).float().mean(),
            "implicit_reward": g.detach().mean(),
            "raw_model_loss": L.detach().mean(),
            "raw_ref_loss": R.mean(),
            "n_desirable": desirable.sum().to(torch.float32),
            "n_undesirable": (~desirable).sum().to(torch.float32),
        }
    return loss, metrics


def dragon_dpo_loss(model_losses_w: torch.Tensor, model_losses_l: torch.Tensor, ref_losses_w: torch.Tensor,
                    ref_losses_l: torch.Tensor, beta: float = 5000.0, half_factor: bool = True) -> Tuple[torch.Tensor, dict]:
    """DRAGON's paired branch: the Diffusion-DPO loss on (chosen, rejected) demonstrations ([code], dragon.md §2.1)::

        z_b = −(½)·β·[(L_w − L_l) − (R_w − R_l)],   loss = −mean_b logσ(z_b)

    The same formula as :func:`genalign.objectives.dpo.diffusion_dpo_loss` (a test pins the equality; objectives
    do not import each other), with DRAGON's recommended β = 5000 ([unknown → rec.]; the official image value,
    mean-reduced MSE, ½ factor as ``SalesforceAIResearch/DiffusionDPO@5233e75`` ``train.py``).

    Args:
        model_losses_w, model_losses_l: (B,) policy MSEs of chosen / rejected (carry the graph).
        ref_losses_w, ref_losses_l: (B,) reference MSEs at the same inputs (detached here).
        beta: β > 0. half_factor: the ½ of the official code (False: the paper's pseudocode).

    Returns:
        ``(loss, metrics)`` with ``implicit_acc`` (z > 0, ties ½), ``model_diff``, ``ref_diff``, ``logit``.

    Raises:
        ValueError: the four inputs are not (B,) of one shape, or β ≤ 0.
    """
    shapes = {tuple(t.shape) for t in (model_losses_w, model_losses_l, ref_losses_w, ref_losses_l)}
    if len(shapes) != 1 or model_losses_w.ndim != 1:
        raise ValueError(f"expected four (B,) tensors of one shape, got {sorted(shapes)}")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be > 0, got {beta!r}")
    model_diff = model_losses_w.float() - model_losses_l.float()
    ref_diff = (ref_losses_w.float() - ref_losses_l.float()).detach()
    z = -(0.5 * beta if half_factor else beta) * (model_diff - ref_diff)
    loss = -F.logsigmoid(z).mean()
    with torch.no_grad():
        metrics = {"loss": loss.detach(), "implicit_acc": ((z > 0).float() + 0.5 * (z == 0).float()).mean(),
                   "model_diff": model_diff.detach().mean(), "ref_diff": ref_diff.mean(), "logit": z.detach().mean()}
    return loss, metrics


# --------------------------------------------------------------------------------------------------------------
# The `dragon` objective: online rounds, instance / instance-to-set / set rewards
# --------------------------------------------------------------------------------------------------------------


class DragonRewardTerm(RewardItem):
    """One reward of a DRAGON run (``objective.rewards[i]``): the top-level ``rewards`` entry shape
    (``name``, ``weight``, ``normalize``, ``kwargs``) plus what distribution rewards need.

    Attributes:
        name: a registered reward (``genalign list rewards``), or ``exemplar_fd`` (= ``fad-dataset`` with reference
            statistics computed from ``exemplars`` with ``encoder``).
        weight: weight of this term's per-item values in the combined score.
        normalize: per-item normalisation within the round before weighting: none | zscore | rank.
        kind: auto (the reward's own ``kind``), instance, or set (scored through leave-one-out credit).
        input: feed the decoded samples or the generation latents (VAE-FAD: ``fad-song`` + ``encoder: frames``).
        encoder: a :class:`~genalign.rewards.terms.FeatureEncoder` kind (``digits``, ``pixels``, ``frames``,
            ``clap``) or None for the reward's default.
        exemplars: reference set spec (:func:`~genalign.data.exemplars.load_exemplars`).
        kwargs: constructor arguments of the reward (``tiny``, ``weights``, ``q``...).
    """

    normalize: Literal["none", "zscore", "rank"] = "none"
    kind: Literal["auto", "instance", "set"] = "auto"
    input: Literal["samples", "latents"] = "samples"
    encoder: str | None = None
    exemplars: str | None = None


class DragonData:
    """The current round's demonstrations as model inputs (``n`` changes from round to round).

    Paired: ``batch(idx)`` → ``{"latents_w", "latents_l", "cond"}``; unpaired: ``{"latents", "labels", "cond"}``.
    """

    def __init__(self, objective: "DRAGON"):
        self.obj = objective
        self.skipped: dict[str, int] = {}

    @property
    def n(self) -> int:
        return int(self.obj.demos["n"])

    def batch(self, idx: torch.Tensor) -> dict[str, Any]:
        d, dev = self.obj.demos, self.obj.model.device
        cond = cond_to(index_cond(d["cond"], idx), dev)
        if d["paired"]:
            return {"latents_w": d["latents_w"][idx].to(dev), "latents_l": d["latents_l"][idx].to(dev),
                    "cond": cond, "ids": idx.tolist()}
        return {"latents": d["latents"][idx].to(dev), "labels": d["labels"][idx].to(dev), "cond": cond,
                "ids": idx.tolist()}


@_OBJECTIVES.register("dragon", "DRAGON: on-policy D+/D- from instance, instance-to-set and set rewards, "
                                "Diffusion-DPO (paired) or Diffusion-KTO (unpaired) (Bai et al. 2025)")
class DRAGON(Objective):
    """DRAGON's online loop inside the trainer.

    Round r (at the start, then every ``steps_per_round`` optimizer steps, or one pass over the round's
    demonstrations counted in optimizer steps with gradient accumulation and ranks): sample ``prompts_per_round``
    training prompts, generate ``clips_per_prompt`` samples each with the *current* policy (seeded, no grad,
    latents kept), score every :class:`DragonRewardTerm` (instance rewards per item; set rewards on the round's
    whole set, per-item credit by leave-one-out), combine ``Σ w_k·N_k(value)``, build D+/D− (paired for DPO: best
    vs worst per prompt, or the greedy pairwise split for a single set reward with K = 2; unpaired for KTO: the
    combined value above the round median, ties at the top split deterministically), cache them in
    ``RUN_DIR/dragon/round{r}.pt``, and train on them with Diffusion-DPO or Diffusion-KTO against the frozen
    reference.

    Evaluation: before training the base model (reference) generates ``win_rate_samples_per_prompt`` samples per
    held-out prompt with fixed seeds; :meth:`summary_metrics` regenerates them with the trained model and reports
    per term the reward before/after and the paper's per-sample win rate (aligned vs base sample, same prompt and
    seed; ties ½) with its Wilson interval and sign-test p-value; set rewards use the swap-in comparison
    (:func:`~genalign.evaluation.winrate.set_swap_win_rate`) and also report the subset-bootstrap preference under
    its own name (not a win rate).

    Source: Bai et al., TMLR 2025 (arXiv 2504.15217); card dragon.md. No official code: the builders, the loss
    choice per reward kind, β, round sizes and the win-rate protocol are [recon] / [unknown → rec.] options.
    """

    class Config(ObjectiveParams):
        rewards: list[DragonRewardTerm] = Field(
            default_factory=list, description="target rewards; empty = the run's `rewards` composite as one "
                                              "instance reward")
        loss: Literal["auto", "dpo", "kto"] = Field(
            "auto", description="auto = DPO-paired when every term is an instance reward, else KTO-unpaired "
                                "[unknown → rec.]")
        beta_dpo: float = Field(5000.0, gt=0, description="Diffusion-DPO β, mean reduction, ½ factor "
                                                          "[unknown → rec.] (image value)")
        beta_kto: float = Field(1000.0, gt=0, description="Diffusion-KTO β, mean reduction [unknown → rec.]")
        half_factor: bool = Field(True, description="½ in the DPO logit [code]")
        reduction: Literal["mean", "sum"] = Field("mean", description="per-sample MSE reduction [code]")
        lambda_desirable: float = Field(1.0, ge=0, description="KTO λ_D [code]")
        lambda_undesirable: float = Field(1.0, ge=0, description="KTO λ_U [code]")
        unpaired_threshold: Literal["median", "mean"] = Field("median", description="D+ = value > threshold [recon]")
        set_pair_builder: Literal["greedy", "best_worst"] = Field(
            "greedy", description="paired + a single set reward: greedy pairwise split (K = 2) or best/worst of "
                                  "leave-one-out credit [recon]")
        tie_tol: float = Field(0.0, ge=0, description="pairs whose best − worst ≤ tie_tol are dropped and counted")
        prompts_per_round: int = Field(32, ge=1, description="P [unknown → rec.] (card: 256)")
        clips_per_prompt: int = Field(4, ge=2, description="K [unknown → rec.] (card: 4; 2 for set-reward pairs)")
        steps_per_round: int | None = Field(None, ge=1, description="optimizer steps per round; None = one pass "
                                                                   "over the round's demonstrations [unknown → rec.]")
        num_inference_steps: int = Field(25, ge=1, description="sampler steps for demonstrations (card Fig. 3)")
        guidance_scale: float = Field(1.0, ge=0)
        sample_batch_size: int = Field(64, ge=1)
        win_rate_prompts: str | None = Field(None, description="win-rate prompts; None = validation.prompts")
        win_rate_samples_per_prompt: int = Field(4, ge=1)
        win_rate_seed: int = Field(4321)
        win_rate_subsets: int = Field(200, ge=1, description="subsets of the subset-bootstrap preference [rec.]")

    needs_reference = True
    needs_reward = True
    data_kind = "prompts"
    data_sources = ("prompts",)

    def __init__(self, config, model):
        super().__init__(config, model)
        self.clock = RoundClock()
        self.demos: dict[str, Any] = {"n": 0}
        self.base_eval: dict[str, Any] = {}
        self._ctx: TrainContext | None = None
        self.terms: list = []  # RewardTerm / CompositeTerm
        self.seed, self.total_steps, self.batch_size, self.world, self.accumulation = 0, 0, 1, 1, 1

    @property
    def round(self) -> int:
        """0-based on-policy round."""
        return self.clock.round

    # -- setup ----------------------------------------------------------------------------------------------
    @property
    def loss_kind(self) -> str:
        """"dpo" or "kto" (``loss: auto`` resolves by reward kinds, card §2.3)."""
        if self.config.loss != "auto":
            return self.config.loss
        return "dpo" if all(t.kind == "instance" for t in self.terms) else "kto"

    def build_terms(self, ctx_rewards=None) -> None:
        """Build the reward terms (exemplar statistics computed once); none configured = the run's composite.

        Raises:
            ValueError: no reward at all (empty ``objective.rewards`` and no run ``rewards``).
        """
        m, dev = self.model, self.model.device
        self.terms = [RewardTerm(t.name, t.kwargs, t.kind, t.input, t.encoder,
                                 load_exemplars(t.exemplars, getattr(m, "resolution", None),
                                                getattr(m, "sample_rate", None)) if t.exemplars else None,
                                 t.exemplars, m, dev, t.weight, t.normalize) for t in self.config.rewards]
        if not self.terms:
            if ctx_rewards is None:
                raise ValueError("dragon: no reward (objective.rewards is empty and the run has no `rewards`)")
            self.terms = [CompositeTerm(ctx_rewards, dev)]

    def build_data(self, ctx: TrainContext) -> DragonData:
        """Prompts, reward terms, the base model's evaluation set and round 0's demonstrations.

        Raises:
            ValueError: ``data.source`` is not ``kind: prompts``.
        """
        src, c = ctx.cfg.data.source, self.config
        if src.kind != "prompts":
            raise ValueError(f"data.source.kind: {src.kind!r}: dragon generates on-policy from prompts (kind: prompts)")
        self._ctx, self.seed, self.total_steps = ctx, ctx.cfg.seed, ctx.cfg.train.steps
        self.batch_size, self.accumulation = ctx.cfg.train.batch_size, ctx.cfg.train.gradient_accumulation_steps
        self.world = getattr(ctx.accelerator, "num_processes", 1)
        self.prompts = load_prompts(src.prompts)
        self.build_terms(ctx.rewards)
        vcfg = ctx.cfg.validation
        self.eval_prompts = [p for p in load_prompts(c.win_rate_prompts or vcfg.prompts, vcfg.max_prompts)
                             for _ in range(c.win_rate_samples_per_prompt)]
        if not self.base_eval:
            self.base_eval = self.evaluate(self.eval_prompts, use_reference=True)
        self.load_or_generate_round(0)
        lat = self.demos["latents_w" if self.demos["paired"] else "latents"]
        d, beta = int(lat[0].numel()), c.beta_dpo if self.loss_kind == "dpo" else c.beta_kto
        other = "sum" if c.reduction == "mean" else "mean"
        logger.info("dragon (%s): beta=%g with %s reduction over D=%d elements = beta=%g with %s reduction",
                    self.loss_kind, beta, c.reduction, d, convert_beta(beta, c.reduction, other, d), other)
        return DragonData(self)

    # -- generation, scoring, demonstrations -------------------------------------------------------------------
    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model.decode(latents[i:i + 64].to(self.model.device)).float().cpu()
                          for i in range(0, latents.shape[0], 64)])

    @torch.no_grad()
    def evaluate(self, prompts: list[str], use_reference: bool = False) -> dict[str, Any]:
        """Fixed-seed samples for ``prompts`` (sample i: seed ``win_rate_seed + i``) scored by every term."""
        c = self.config
        gens = [torch.Generator().manual_seed(c.win_rate_seed + i) for i in range(len(prompts))]
        lat = sample_latents(self.model, prompts, gens, c.num_inference_steps, c.guidance_scale,
                             use_reference=use_reference, batch_size=c.sample_batch_size)
        evals = evaluate_terms(self.terms, self._decode(lat), lat, prompts)
        return {t.label: ev for t, ev in zip(self.terms, evals)}

    def build_demonstrations(self, latents: torch.Tensor, prompts: list[str], evals: list[dict[str, Any]],
                             num_prompts: int, k: int) -> dict[str, Any]:
        """D+/D− from one round's generations as configured (:func:`~genalign.evaluation.demonstrations.split_round`)."""
        c = self.config
        return split_round(self.terms, latents, prompts, evals, num_prompts, k, paired=self.loss_kind == "dpo",
                           set_pair_builder=c.set_pair_builder, tie_tol=c.tie_tol,
                           unpaired_threshold=c.unpaired_threshold)

    @torch.no_grad()
    def generate_round(self, r: int) -> dict[str, Any]:
        """Generate, score and split round ``r`` with the current policy (deterministic in (seed, r))."""
        c = self.config
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + r)
        P, K = c.prompts_per_round, c.clips_per_prompt
        pick = torch.randint(0, len(self.prompts), (P,), generator=g) if P > len(self.prompts) else \
            torch.randperm(len(self.prompts), generator=g)[:P]
        expanded = [self.prompts[i] for i in pick.tolist() for _ in range(K)]
        gens = [torch.Generator().manual_seed(self.seed * 7_919 + r * 100_003 + i) for i in range(len(expanded))]
        lat = sample_latents(self.model, expanded, gens, c.num_inference_steps, c.guidance_scale,
                             batch_size=c.sample_batch_size)
        evals = evaluate_terms(self.terms, self._decode(lat), lat, expanded)
        demos = self.build_demonstrations(lat, expanded, evals, P, K)
        stats = {"round": r}
        for t, ev in zip(self.terms, evals):
            stats[f"reward/{t.label}"] = float(ev["values"].mean() if ev["kind"] == "instance" else ev["value"])
        stats.update(n_demos=demos["n"], dropped=demos["dropped"])
        if not demos["paired"]:
            stats["n_desirable"] = int(demos["labels"].sum())
        demos["stats"] = json.dumps(stats)
        demos["fingerprint"] = self._round_fingerprint(r)
        return demos

    def _round_fingerprint(self, r: int) -> str:
        """Identity of round r's settings (seed, round, objective config): a cached file from another run is refused."""
        return fingerprint({"seed": self.seed, "round": r, "config": self.config.model_dump_json()})

    def load_or_generate_round(self, r: int) -> None:
        """Round ``r``'s demonstrations: from ``RUN_DIR/dragon/round{r}.pt`` if present (resume), else generated by
        rank 0 with the current policy and saved; conditioning encoded here.

        Raises:
            ValueError: every prompt of the round was a tie (no demonstration).
        """
        path = None if self._ctx is None else Path(self._ctx.run_dir) / "dragon" / f"round{r}.pt"
        demos = load_or_build_round(path, lambda: self.generate_round(r), self._round_fingerprint(r),
                                    getattr(self._ctx, "accelerator", None))
        if demos["n"] == 0:
            raise ValueError(f"dragon round {r}: no demonstration (all {demos['dropped']} prompts tied)")
        demos["cond"] = encode_prompts(self.model, demos["prompts"])
        self.demos, self.clock.round = demos, r
        stats = json.loads(demos["stats"])
        if not any(h.get("round") == r for h in self.clock.history):
            self.clock.history.append(stats)
        logger.info("dragon round %d: %s", r, stats)

    def round_steps(self) -> int:
        """Optimizer steps of the current round: ``steps_per_round``, or one pass over its demonstrations with
        ``batch_size`` rows per micro-step, ``gradient_accumulation_steps`` micro-steps per optimizer step and every
        rank (issue 14 item 8)."""
        if self.config.steps_per_round:
            return self.config.steps_per_round
        return optimizer_steps_per_pass(self.demos["n"], self.batch_size, self.world, self.accumulation)

    def on_step_end(self, step: int) -> StepResult:
        """Start the next round (regenerate on-policy) when the current one is used up."""
        if self.clock.steps_in_round(step) >= self.round_steps() and step < self.total_steps:
            self.clock.start_step = step
            self.load_or_generate_round(self.round + 1)
        return StepResult()

    # -- loss -----------------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> LossOutput:
        """Diffusion-DPO on (w, l) demonstrations or Diffusion-KTO on labelled ones."""
        c = self.config
        if "latents_w" in batch:
            out = paired_denoising_losses(self.model, batch["latents_w"], batch["latents_l"], batch["cond"],
                                          generator, reduction=c.reduction, with_reference=True)
            loss, metrics = dragon_dpo_loss(out.losses_w, out.losses_l, out.ref_w, out.ref_l, beta=c.beta_dpo,
                                            half_factor=c.half_factor)
        else:
            out = shared_noise_losses(self.model, batch["latents"], batch["cond"], generator, reduction=c.reduction)
            acc = getattr(self._ctx, "accelerator", None)
            reduce_fn = (lambda z: acc.reduce(z, "mean")) if acc is not None and acc.num_processes > 1 else None
            loss, metrics = diffusion_kto_loss(out.losses, out.ref_losses, batch["labels"], beta=c.beta_kto,
                                               lambda_desirable=c.lambda_desirable,
                                               lambda_undesirable=c.lambda_undesirable, reduce_fn=reduce_fn)
        metrics = {k: float(v) for k, v in metrics.items() if k != "loss"}  # the trainer logs the loss itself
        metrics["round"] = float(self.round)
        for k, v in json.loads(self.demos.get("stats", "{}")).items():
            if k.startswith("reward/"):
                metrics["round_" + k] = float(v)
        return LossOutput(loss, metrics)

    # -- evaluation / state ---------------------------------------------------------------------------------
    def summary_metrics(self) -> dict[str, Any]:
        """For summary.json: per-term reward before/after + win rate vs the base model, and the round history."""
        new = self.evaluate(self.eval_prompts, use_reference=False)
        rates = term_win_rates(self.terms, new, self.base_eval, self.config.win_rate_subsets, self.config.win_rate_seed)
        return {"loss": self.loss_kind, "win_rate": {k: v["win_rate"] for k, v in rates.items()}, "terms": rates,
                "rounds": self.clock.history, "eval_samples": len(self.eval_prompts)}

    def state_dict(self) -> dict[str, Any]:
        """Round clock and the base model's evaluation (so a resume compares against the same samples)."""
        return {**self.clock.state_dict(), "base_eval": {k: dict(v) for k, v in self.base_eval.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the round (its demonstrations are reloaded from the run folder) and the base evaluation."""
        r = int(state.get("round", 0))
        self.clock.load_state_dict({**state, "round": self.round})
        self.base_eval = dict(state.get("base_eval", {})) or self.base_eval
        if r != self.round:
            self.load_or_generate_round(r)
