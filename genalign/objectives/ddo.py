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

This file: the pure losses, then the ``ddo`` objective (real data vs the frozen reference's samples, self-play
rounds). Machinery lives below: shared-noise losses in :mod:`genalign.pipelines.denoising`, sampling in
:mod:`genalign.pipelines.sampling`, LoRA folding in :mod:`genalign.pipelines.lora` (through the adapter's
``fold_lora`` verb), round bookkeeping in :mod:`genalign.objectives.rounds`, FD selection in
:mod:`genalign.evaluation.selection`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from pydantic import Field

from genalign.data.exemplars import LatentRows, load_real_samples
from genalign.evaluation.selection import FrechetSelector
from genalign.objectives.base import LossOutput, Objective, ObjectiveParams, StepResult, TrainContext
from genalign.objectives.rounds import BestCheckpoint, RoundClock, fingerprint, load_or_build_round
from genalign.pipelines.base import cond_to, index_cond
from genalign.pipelines.denoising import convert_beta, shared_noise_losses
from genalign.pipelines.denoising import per_sample_error as _per_sample_error
from genalign.pipelines.lora import load_trainable_snapshot, trainable_snapshot
from genalign.pipelines.sampling import cat_cond, cond_where, encode_prompts, sample_latents
from genalign.pipelines.schedule import edm_f_target, edm_preconditioning
from genalign.registry import objectives as _OBJECTIVES

__all__ = ["ddo_loss", "ddo_loss_from_log_ratios", "per_sample_error", "convert_beta", "edm_preconditioning",
           "edm_f_target", "DDOData", "DDO"]

logger = logging.getLogger(__name__)


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


def per_sample_error(pred: torch.Tensor, target: torch.Tensor, reduction: str = "sum",
                     weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample squared error ‖pred − target‖² in fp32, ``(B, ...)`` → ``(B,)``, with DDO's default **sum**
    reduction ([recon], ELBO scale); "mean" averages over the D non-batch elements. ``weight``: optional (B,) w(t).

    :func:`genalign.pipelines.denoising.per_sample_error` with DDO's default. Raises ValueError on shape mismatch,
    unknown reduction or a bad weight shape.
    """
    return _per_sample_error(pred, target, reduction, weight)


# ==============================================================================================================
# The `ddo` objective: real data vs the frozen reference's own samples, self-play rounds
# ==============================================================================================================


DDOData = LatentRows  # DDO's real rows: cached latents + conditioning (the reference's samples stay in the objective)


@_OBJECTIVES.register("ddo", "DDO: real data vs the frozen reference's samples, implicit likelihood-ratio "
                             "discriminator, self-play rounds (Zheng et al. 2025)")
class DDO(Objective):
    """Direct Discriminative Optimization on real images (or audio clips) against the reference's samples.

    Per micro-step: B real rows (``data.source`` ``kind: images``: an image dataset, or for audio adapters a folder
    of clips with ``metadata.jsonl``) and ``round(B·fake_batch_ratio)`` reference samples; each sample gets one
    (t, ε) shared by the trained network and the reference (:func:`~genalign.pipelines.denoising.shared_noise_losses`);
    the loss is :func:`ddo_loss` on the per-sample errors (sum reduction by default, β = 0.05, α = 4). Fakes come
    from the frozen reference: generated once per round and cached in ``RUN_DIR/ddo/fakes_round{r}.pt`` with the
    reference's fingerprint (``fake_source: offline``), or sampled per micro-step (``online``).

    Self-play (``rounds > 1``): at the end of each round the round's best checkpoint (``round_selection``: the last
    iterate, or the lowest Frechet distance to the real data among candidates taken every ``selection_every``
    steps) becomes the new reference **and** initialisation: with LoRA and ``reference: adapter_off`` the adapter
    folds its LoRA into the base weights in fp32 (``model.fold_lora``) and re-initialises it (B = 0); with a full
    fine-tune and ``frozen_copy`` the frozen copy is overwritten. :meth:`on_step_end` then asks the trainer for
    fresh optimizer moments and the fakes are regenerated. The round state (round index, folded LoRA snapshots or
    the frozen copy, selection history) is in :meth:`state_dict`, so a resumed run rebuilds the same reference.

    Source: Zheng et al., ICML 2025 (arXiv 2503.01103) Eq. 13-16, §3.3 (rounds); card ddo.md. No official
    training code: sampling of fakes, batch ratio, selection and round length are [unknown → rec.] options.
    """

    class Config(ObjectiveParams):
        alpha: float = Field(4.0, gt=0, description="fake-term weight α [unknown → rec.] (paper grid 0.5-6)")
        beta: float = Field(0.05, gt=0, description="β in the `reduction` convention [unknown → rec.] (0.01-0.1, sum)")
        reduction: Literal["sum", "mean"] = Field("sum", description="per-sample error reduction [recon]; mean ⇒ β·D")
        fake_source: Literal["offline", "online"] = Field("offline", description="fakes cached per round, or per "
                                                                               "step [paper]")
        num_fakes: int | None = Field(None, ge=2, description="fakes per round; None = min(real rows, 2048) [rec.]")
        fake_batch_ratio: float = Field(1.0, gt=0, description="fake rows per real row [unknown → rec.] 1 : 1")
        fake_num_inference_steps: int = Field(25, ge=1, description="reference sampler steps [unknown → rec.]")
        fake_guidance_scale: float = Field(1.0, ge=0, description="CFG for fakes; off [unknown → rec.]")
        caption_dropout: float = Field(0.0, ge=0, lt=1, description="empty-prompt probability (pretraining) [2nd]")
        rounds: int = Field(1, ge=1, description="self-play rounds [paper §3.3]")
        steps_per_round: int | None = Field(None, ge=1, description="None = ceil(train.steps / rounds)")
        round_selection: Literal["last", "fd"] = Field(
            "last", description="a round's checkpoint: last iterate, or lowest FD to the real data [paper: FID; recon]")
        selection_every: int = Field(0, ge=0, description="fd: a candidate every N steps (0 = round end only)")
        selection_samples: int = Field(128, ge=4, description="samples per candidate evaluation")
        selection_features: Literal["latents", "digits"] = Field("latents", description="FD feature space")
        selection_num_inference_steps: int = Field(25, ge=1)
        sample_batch_size: int = Field(64, ge=1, description="batch size of fake / selection sampling")

    needs_reference = True
    data_kind = "images"
    data_sources = ("images",)

    def __init__(self, config, model):
        super().__init__(config, model)
        self.clock = RoundClock()
        self.best = BestCheckpoint()
        self.merged: list[dict[str, torch.Tensor]] = []  # LoRA snapshots folded into the base, one per round
        self.ref_state: dict[str, torch.Tensor] = {}  # frozen-copy reference after a switch (full fine-tunes)
        self._fakes: dict[str, Any] | None = None
        self._ctx: TrainContext | None = None
        self._selector: FrechetSelector | None = None
        self.total_steps = 0
        self.seed = 0

    @property
    def round(self) -> int:
        """0-based self-play round."""
        return self.clock.round

    @property
    def history(self) -> list[dict[str, Any]]:
        """Selection candidates and closed rounds (JSON-able)."""
        return self.clock.history

    # -- data -----------------------------------------------------------------------------------------------
    def build_data(self, ctx: TrainContext) -> DDOData:
        """Real samples → cached latents and conditioning; round-0 fakes generated (or loaded) from the reference.

        Raises:
            ValueError: ``data.source`` is not ``kind: images``.
        """
        cfg, c, model = ctx.cfg, self.config, self.model
        src = cfg.data.source
        if src.kind != "images":
            raise ValueError(f"data.source.kind: {src.kind!r}: ddo needs real data (kind: images)")
        self._ctx, self.seed, self.total_steps = ctx, cfg.seed, cfg.train.steps
        samples, prompts, skipped = load_real_samples(model, src, cfg.seed)
        g = torch.Generator().manual_seed(cfg.seed)
        chunks = []
        with ctx.progress("ddo: encode real samples", total=len(samples), unit="sample") as bar:
            for i in range(0, len(samples), 64):
                chunks.append(model.encode(samples[i:i + 64], generator=g).float().cpu())
                bar.update(len(chunks[-1]))
        lat = torch.cat(chunks)
        self._null_cond = encode_prompts(model, [""])
        d = int(lat[0].numel())
        other = "mean" if c.reduction == "sum" else "sum"
        logger.info("ddo: beta=%g with %s reduction over D=%d elements = beta=%g with %s reduction", c.beta,
                    c.reduction, d, convert_beta(c.beta, c.reduction, other, d), other)
        images = samples if samples.ndim == 4 else None
        self.data = DDOData(model, lat, prompts, encode_prompts(model, prompts), skipped, images=images)
        if c.fake_source == "offline":
            self._ensure_fakes()
        return self.data

    @property
    def steps_per_round(self) -> int:
        """Optimizer steps of rounds before the last (the last runs until ``train.steps``)."""
        c = self.config
        return c.steps_per_round or max(1, math.ceil(max(1, self.total_steps) / c.rounds))

    def reference_fingerprint(self) -> str:
        """Identifies the current reference: model id, round, and every folded snapshot / frozen-copy weight."""
        ident = getattr(getattr(self._ctx, "cfg", None), "pipeline", None)
        return fingerprint({"model": getattr(ident, "model", "?"), "round": self.round, "merged": self.merged,
                            "ref_state": self.ref_state})

    def _generate_fakes(self) -> dict[str, Any]:
        seed = self.seed * 31 + self.round
        num = self.config.num_fakes or min(self.data.n, 2048)
        g = torch.Generator().manual_seed(seed)
        rows = torch.randint(0, self.data.n, (num,), generator=g)
        prompts = [self.data.prompts[i] for i in rows.tolist()]
        gens = [torch.Generator().manual_seed(seed * 7919 + i) for i in range(num)]
        lat = sample_latents(self.model, prompts, gens, self.config.fake_num_inference_steps,
                             self.config.fake_guidance_scale, use_reference=True,
                             batch_size=self.config.sample_batch_size)
        return {"latents": lat, "rows": rows, "ref_fingerprint": self.reference_fingerprint(), "round": self.round}

    def _ensure_fakes(self) -> dict[str, Any]:
        """The current round's offline fakes: loaded from ``RUN_DIR/ddo/fakes_round{r}.pt`` or generated by rank 0.

        Raises:
            RuntimeError: the cached file was produced by a different reference than the current one.
        """
        if self._fakes is not None and self._fakes["round"] == self.round:
            return self._fakes
        path = None if self._ctx is None else Path(self._ctx.run_dir) / "ddo" / f"fakes_round{self.round}.pt"
        fakes = load_or_build_round(path, self._generate_fakes, self.reference_fingerprint(),
                                    getattr(self._ctx, "accelerator", None), key="ref_fingerprint")
        fakes["cond"] = index_cond(self.data.cond, fakes["rows"])
        self._fakes = fakes
        return fakes

    def _fake_batch(self, num: int, generator: Optional[torch.Generator]):
        dev = self.model.device
        if self.config.fake_source == "offline":
            fakes = self._ensure_fakes()
            idx = torch.randint(0, fakes["latents"].shape[0], (num,), generator=generator)
            return fakes["latents"][idx].to(dev), cond_to(index_cond(fakes["cond"], idx), dev)
        rows = torch.randint(0, self.data.n, (num,), generator=generator)
        seeds = torch.randint(0, 2**31 - 1, (num,), generator=generator).tolist()
        lat = sample_latents(self.model, [self.data.prompts[i] for i in rows.tolist()],
                             [torch.Generator().manual_seed(s) for s in seeds], self.config.fake_num_inference_steps,
                             self.config.fake_guidance_scale, use_reference=True)
        return lat.to(dev), cond_to(index_cond(self.data.cond, rows), dev)

    # -- loss -----------------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> LossOutput:
        """DDO on B real rows + round(B·ratio) reference samples; metrics ``d_real``, ``d_fake``, ``disc_acc``, ..."""
        c = self.config
        real, cond_real = batch["latents"], batch["cond"]
        b = real.shape[0]
        fake, cond_fake = self._fake_batch(max(1, int(round(b * c.fake_batch_ratio))), generator)
        x0 = torch.cat([real, fake.to(real.dtype)])
        cond = cat_cond([cond_real, cond_fake])
        if c.caption_dropout > 0:
            drop = torch.rand(x0.shape[0], generator=generator) < c.caption_dropout
            cond = cond_where(~drop, cond, cond_to(cat_cond([self._null_cond] * x0.shape[0]), real.device))
        out = shared_noise_losses(self.model, x0, cond, generator, reduction=c.reduction)
        loss, metrics = ddo_loss(out.losses[:b], out.ref_losses[:b], out.losses[b:], out.ref_losses[b:],
                                 alpha=c.alpha, beta=c.beta)
        metrics = {k: float(v) for k, v in metrics.items() if k != "loss"}  # the trainer logs the loss itself
        metrics["round"] = float(self.round)
        return LossOutput(loss, metrics)

    # -- rounds ---------------------------------------------------------------------------------------------
    def selection_score(self) -> float:
        """Frechet distance (lower is better) of ``selection_samples`` fixed-seed policy samples to the real data."""
        c = self.config
        if self._selector is None:
            self._selector = FrechetSelector(self.data.prompts, self.data.latents, self.data.images,
                                             c.selection_features, self.seed, c.selection_samples,
                                             c.selection_num_inference_steps, c.sample_batch_size)
        return self._selector.score(self.model)

    def _consider_candidate(self, step: int) -> None:
        score = self.selection_score()
        self.history.append({"round": self.round, "step": step, "fd": score})
        self.best.consider(step, score, lambda: trainable_snapshot(self.model.denoiser()))
        logger.info("ddo round %d step %d: selection FD %.4f (best %.4f at step %d)", self.round, step, score,
                    self.best.best["score"], self.best.best["step"])

    def on_step_end(self, step: int) -> StepResult:
        """After every optimizer step: selection candidates and round switches (fresh optimizer moments asked for).

        Round r < rounds − 1 ends after ``steps_per_round`` steps; the last round runs until ``train.steps``.
        """
        c = self.config
        in_round = self.clock.steps_in_round(step)
        round_over = step >= self.total_steps if self.round >= c.rounds - 1 else in_round >= self.steps_per_round
        if c.round_selection == "fd" and c.selection_every and in_round % c.selection_every == 0 and not round_over:
            self._consider_candidate(step)
        if round_over and not self.clock.finished:
            return self.end_round(step)
        return StepResult()

    def end_round(self, step: int) -> StepResult:
        """Close the current round at ``step``: load its best checkpoint into the policy; unless it was the last
        round, make that checkpoint the new reference (and initialisation) and regenerate the fakes."""
        c = self.config
        chosen = step
        if c.round_selection == "fd":
            self._consider_candidate(step)
            load_trainable_snapshot(self.model.denoiser(), self.best.best["snapshot"])
            chosen = self.best.best["step"]
        self.history.append({"round": self.round, "selected_step": chosen, "end_step": step})
        self.best.reset()
        if self.round >= c.rounds - 1:
            self.clock.finished = True
            return StepResult()
        result = self.switch_reference()
        self.clock.start_step = step
        if c.fake_source == "offline" and self._ctx is not None:
            self._ensure_fakes()
        return result

    @torch.no_grad()
    def switch_reference(self) -> StepResult:
        """The current policy becomes the reference and the new initialisation (round += 1); fakes invalidated.

        Returns ``StepResult(reset_optimizer_state=True)``: the paper restarts each round from θ*_n.

        Raises:
            RuntimeError: ``adapter_off`` reference but the network has no LoRA layers.
            NotImplementedError: LoRA with ``reference: frozen_copy``.
        """
        raw = self.model.denoiser()
        if self.model.ref_unet is None:
            snap = trainable_snapshot(raw)
            torch.manual_seed(self.seed * 1009 + self.round)  # deterministic re-initialisation of LoRA A
            if self.model.fold_lora(reset=True) == 0:
                raise RuntimeError("ddo rounds: reference adapter_off but the network has no LoRA layers")
            self.merged.append(snap)
        else:
            if self.model.lora is not None:
                raise NotImplementedError("ddo rounds with LoRA need reference: adapter_off (frozen_copy is for "
                                          "full fine-tunes)")
            self.model.ref_unet.load_state_dict(raw.state_dict())  # one cast to the frozen copy's dtype
            self.ref_state = {k: v.detach().clone().cpu() for k, v in raw.state_dict().items()}
        self.clock.round += 1
        self._fakes = None
        logger.info("ddo: round %d starts; reference = previous round's selected checkpoint", self.round)
        return StepResult(reset_optimizer_state=True)

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Round clock, folded LoRA snapshots (or the frozen copy), the round's best candidate."""
        return {**self.clock.state_dict(), "merged": list(self.merged), "ref_state": dict(self.ref_state),
                "best": dict(self.best.best)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild the reference of a saved round: re-fold the recorded LoRA snapshots into the freshly loaded base
        (the trainable LoRA itself comes from the checkpoint) or load the frozen copy; fakes reload lazily."""
        self.clock.load_state_dict(state)
        self.merged = list(state.get("merged", []))
        for snap in self.merged:
            self.model.fold_lora(snap, reset=False)
        self.ref_state = dict(state.get("ref_state", {}))
        if self.ref_state and self.model.ref_unet is not None:
            self.model.ref_unet.load_state_dict(self.ref_state)
        self.best.best = dict(state.get("best", {}))
        self._fakes = None

    def summary_metrics(self) -> dict[str, Any]:
        """For summary.json: rounds completed, the selection history, the β convention."""
        return {"rounds": self.config.rounds, "final_round": self.round, "round_history": self.history,
                "beta": self.config.beta, "reduction": self.config.reduction}
