"""``few_step``: a one-step / few-step generator built from an SD or SDXL UNet (DI*, R0).

The generator is the pipeline's own UNet used as a direct map from noise to a clean latent, as DMD2 / DI* do:

- **one step** (DI*, DMD2-SDXL): z ~ N(0, I) is fed to the UNet as x_t at a fixed timestep t₀ (default 399) and
  x̂0 = (z − sqrt(1 − ᾱ_t₀)·ε̂)/sqrt(ᾱ_t₀) (ε-prediction; v-prediction: x̂0 = a·z − s·v̂).
  Source: DMD2 ``main/utils.py::get_x0_from_noise`` and ``--conditioning_timestep 399`` (di_star.md §5).
- **K steps** (R0, DMD2 4-step): timesteps t_k = t₀ − k·(t₀ + 1)/K, k = 0..K−1 (t₀ = 999, K = 4 gives DMD2's
  [999, 749, 499, 249]); between steps the generalised DDIM(η) step
  x' = sqrt(ᾱ')·x̂0 + sqrt(1 − ᾱ' − σ_η²)·ε̂ + σ_η·ξ (:func:`genalign.pipelines.rollout.ddim_random_eta_step`) with a
  per-sample η (training: random η ~ U[η_lo, η_hi]; inference: a fixed η, default 0 = deterministic DDIM). The last
  step returns x̂0. Source: r0.md §2.1 (random-η rollout, [recon]).

**Export** (:meth:`FewStepMixin.write_export`): a standard Diffusers folder (``StableDiffusionPipeline`` /
``StableDiffusionXLPipeline``) whose scheduler is a vanilla ``DDIMScheduler`` configured so that
``pipe(prompt, num_inference_steps=K, guidance_scale=0.0)`` runs exactly this sampler at η = 0:
``num_train_timesteps = t₀ + 1`` with ``trained_betas`` = the first t₀ + 1 betas of the base schedule (so ᾱ_t is
unchanged for every t ≤ t₀), ``timestep_spacing = "trailing"`` (timesteps t₀, t₀ − (t₀+1)/K, ...) and
``set_alpha_to_one = True`` (the last step lands on ᾱ = 1, i.e. returns x̂0 exactly). No custom code is shipped.
DMD2's own recipe, ``LCMScheduler`` with ``timesteps=[399]``, gives the same one-step image (LCM's c_skip(399)
≈ 1.6e-8). Source: Diffusers ``DDIMScheduler.set_timesteps`` / ``step`` (v0.42).

Mixed precision (issue 13 §2): the export never adds a LoRA delta to half-precision weights. With the run config,
the frozen components and the base UNet come from a fresh fp32 load of ``pipeline.model`` and the LoRA delta is
added to those fp32 originals (:func:`genalign.pipelines.lora.lora_delta`, fp32); every component is saved in fp32.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from genalign.pipelines.base import DiffusionAdapter, load_pipeline_from_config
from genalign.pipelines.lora import lora_delta, lora_layers, merged_base_state
from genalign.pipelines.rollout import ddim_random_eta_step
from genalign.pipelines.schedule import alpha_bar_at, x0_and_epsilon, x0_from_epsilon
from genalign.pipelines.sd import SDAdapter
from genalign.pipelines.sdxl import SDXLAdapter
from genalign.registry import objectives as OBJECTIVES
from genalign.registry import pipelines as PIPELINES

logger = logging.getLogger(__name__)

DEFAULT_FIRST_TIMESTEP = 399  # [card]/[code] DMD2 / DI*-SDXL one-step input timestep
FEW_STEP_FILE = "few_step.json"


def x0_from_noise(z: torch.Tensor, eps_hat: torch.Tensor, timestep: int | torch.Tensor,
                  alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """One-step generator mapping x0 = (z − sqrt(1 − ᾱ_t)·ε̂)/sqrt(ᾱ_t) (DMD2 ``get_x0_from_noise``), fp32.

    Args:
        z: (B, ...) input noise fed to the UNet as x_t. eps_hat: (B, ...) the UNet's ε-prediction at t (with graph).
        timestep: int (399 for DMD2 / DI*-SDXL: ᾱ_399 = 0.426086 under SDXL's scaled-linear schedule) or (B,).
        alphas_cumprod: (T,) schedule.

    Equals ``LCMScheduler(timesteps=[399]).step(...).denoised`` up to LCM's c_skip(399) ≈ 1.6e-8 (di_star.md §5).
    Raises ValueError on a shape mismatch or a timestep outside the schedule.
    """
    return x0_from_epsilon(z, eps_hat, alpha_bar_at(alphas_cumprod, timestep))


def require_few_step(model, objective: str) -> None:
    """Raise ValueError unless ``model`` is a ``few_step`` adapter (the DI* / R0 objectives train one)."""
    if not isinstance(model, FewStepMixin):
        raise ValueError(f"objective {objective!r} trains a one-/few-step generator: use `pipeline.name: few_step` "
                         f"(got the {type(model).__name__} adapter)")


def load_unet_weights(unet: torch.nn.Module, source: str) -> None:
    """Load generator weights (e.g. DMD2's ``dmd2_sdxl_1step_unet_fp16.bin``) into ``unet`` in place, as fp32.

    Args:
        unet: the generator UNet (full fine-tune; LoRA-wrapped UNets have different keys).
        source: a Diffusers UNet folder, a ``.safetensors`` file or a torch ``.bin`` / ``.pt`` state dict.

    Raises:
        FileNotFoundError: ``source`` does not exist (names ``objective.generator_init``). RuntimeError: keys or
        shapes do not match.
    """
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    p = Path(source)
    if not p.exists():
        raise FileNotFoundError(f"objective.generator_init: {source!r} not found (a UNet folder or state-dict file)")
    if p.is_dir():
        state = UNet2DConditionModel.from_pretrained(str(p)).state_dict()
    elif p.suffix == ".safetensors":
        state = load_file(str(p))
    else:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    with torch.no_grad():
        unet.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)


def few_step_timesteps(num_steps: int, first_timestep: int, num_train_timesteps: int = 1000) -> list[int]:
    """The K integer timesteps ``[t₀, t₀ − r, ..., t₀ − (K−1)·r]`` with r = (t₀ + 1)/K.

    They equal ``DDIMScheduler(num_train_timesteps=t₀+1, timestep_spacing="trailing").set_timesteps(K)`` and DDIM's
    own previous-timestep rule t − (t₀+1)//K, which needs (t₀ + 1) divisible by K.

    Args:
        num_steps: K ≥ 1. first_timestep: t₀ in [0, num_train_timesteps − 1].

    Raises:
        ValueError: K < 1, t₀ out of range, or (t₀ + 1) not divisible by K.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 <= first_timestep < num_train_timesteps:
        raise ValueError(f"first_timestep must lie in [0, {num_train_timesteps - 1}], got {first_timestep}")
    if (first_timestep + 1) % num_steps:
        raise ValueError(f"first_timestep + 1 = {first_timestep + 1} must be divisible by num_steps = {num_steps} "
                         "(so vanilla DDIM 'trailing' reproduces the schedule), e.g. 399 for 1 step, 999 for 4 steps")
    r = (first_timestep + 1) // num_steps
    return [first_timestep - k * r for k in range(num_steps)]


def few_step_scheduler(base_config: dict, num_steps: int, first_timestep: int):
    """A vanilla ``DDIMScheduler`` that runs the few-step sampler in ``pipe(..., num_inference_steps=K)``.

    Args:
        base_config: the base pipeline's scheduler config (betas, prediction type).
        num_steps, first_timestep: K and t₀ (validated by :func:`few_step_timesteps`).

    Returns:
        ``DDIMScheduler`` with ``num_train_timesteps=t₀+1``, ``trained_betas`` = the base's first t₀+1 betas,
        ``timestep_spacing="trailing"``, ``set_alpha_to_one=True``, ``clip_sample=False``.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    few_step_timesteps(num_steps, first_timestep, int(base_config.get("num_train_timesteps", 1000)))
    base = DDPMScheduler.from_config(base_config)
    betas = base.betas[: first_timestep + 1].tolist()
    return DDIMScheduler(num_train_timesteps=first_timestep + 1, trained_betas=betas, timestep_spacing="trailing",
                         set_alpha_to_one=True, clip_sample=False, steps_offset=1,
                         prediction_type=base.config.prediction_type)


class FewStepMixin:
    """Few-step generation verbs added to an SD / SDXL adapter (see module docstring).

    Attributes:
        num_steps: K (1 = one-step generator). first_timestep: t₀. eta_inference: η of :meth:`sample` (0 = DDIM).
    """

    num_steps: int = 1
    first_timestep: int = DEFAULT_FIRST_TIMESTEP
    eta_inference: float = 0.0

    def configure_few_step(self, num_steps: int = 1, first_timestep: int = DEFAULT_FIRST_TIMESTEP,
                           eta_inference: float = 0.0) -> None:
        """Set K, t₀ and the inference η (called by the DI* / R0 objectives from their configs).

        Raises:
            ValueError: an invalid schedule (:func:`few_step_timesteps`) or η outside [0, 1].
        """
        few_step_timesteps(num_steps, first_timestep, self.num_train_timesteps)
        if not 0.0 <= eta_inference <= 1.0:
            raise ValueError(f"eta_inference must lie in [0, 1], got {eta_inference}")
        self.num_steps, self.first_timestep, self.eta_inference = int(num_steps), int(first_timestep), float(eta_inference)

    @property
    def timesteps(self) -> list[int]:
        """The configured K timesteps (:func:`few_step_timesteps`)."""
        return few_step_timesteps(self.num_steps, self.first_timestep, self.num_train_timesteps)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t, (T,) float32 on CPU (the base scheduler's)."""
        return self.noise_scheduler.alphas_cumprod

    def x0_eps(self, x_t: torch.Tensor, t: int | torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂0, ε̂) from a network output ``pred`` at x_t, fp32, graph kept (DDIM's formulas,
        :func:`genalign.pipelines.schedule.x0_and_epsilon`). ``t``: int or (B,) long.

        Raises:
            ValueError: a prediction type other than epsilon / v_prediction.
        """
        ab = alpha_bar_at(self.alphas_cumprod, t).to(x_t.device)
        return x0_and_epsilon(pred, x_t, ab, self.prediction_type)

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any], unet=None) -> torch.Tensor:
        """ε̂ ``(B, C, h, w)`` fp32 of ``unet`` (default: the trained generator) at integer timesteps ``t`` ``(B,)``,
        converted from v when the network predicts v (ε = s·x_t + a·v); graph kept (inputs and network)."""
        pred = self.predict(x_t, t.to(x_t.device), cond, unet=unet)
        if self.prediction_type == "epsilon":
            return pred.float()
        return self.x0_eps(x_t, t, pred)[1]

    def predict_eps_cfg_pair(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any],
                             uncond: dict[str, Any], unet=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂(x_t, ∅), ε̂(x_t, c)) from one forward over 2B rows [∅; c] (the numbers of two calls, one launch).

        ``uncond``: B rows (:meth:`encode_uncond`); entries missing from ``uncond`` are taken from ``cond``."""
        both = {k: (torch.cat([u.to(cond[k].dtype), cond[k]]) if isinstance(cond.get(k), torch.Tensor)
                    else cond.get(k, u)) for k, u in uncond.items()}
        eps_u, eps_c = self.predict_eps(torch.cat([x_t, x_t]), torch.cat([t, t]), both, unet=unet).chunk(2)
        return eps_u, eps_c

    @contextlib.contextmanager
    def reference_with_grad(self) -> Iterator[torch.nn.Module]:
        """The frozen reference network **with autograd enabled** (its parameters are frozen; gradients reach its
        inputs): the frozen copy, or the trained network with LoRA disabled (DI*'s teacher, di_star.md §2.2)."""
        if self.ref_unet is not None:
            yield self.ref_unet
            return
        raw = self.denoiser()
        raw.disable_adapters()
        try:
            yield raw
        finally:
            raw.enable_adapters()

    def generate_latents(self, z: torch.Tensor, cond: dict[str, Any], *, unet=None, eta: float | torch.Tensor = 0.0,
                         generator: torch.Generator | None = None, backprop_steps: int | None = None,
                         guidance_scale: float = 0.0, uncond: dict[str, Any] | None = None,
                         num_steps: int | None = None) -> list[torch.Tensor]:
        """K-step rollout from z; returns the per-step predictions [x̂0^(0), ..., x̂0^(K−1)] (the sample is the last).

        Args:
            z: (B, C, h, w) initial noise (fed as x_{t₀}).
            cond: conditioning for B rows (:meth:`encode_prompt`).
            unet: network to use (default: the trained generator).
            eta: scalar or (B,) η in [0, 1] of the DDIM(η) transitions (random per sample in R0 training).
            generator: CPU generator for the re-noising ξ (only drawn when η > 0).
            backprop_steps: None = graph through the whole chain; k = the state entering step K − k is detached.
            guidance_scale: > 1 applies CFG with ``uncond`` (or :meth:`encode_uncond`); ≤ 1 = conditional only.
            num_steps: override K (same t₀).

        Returns:
            list of K fp32 tensors (B, C, h, w), with graph when grad is enabled.

        Raises:
            ValueError: invalid schedule or backprop_steps.
        """
        K = num_steps or self.num_steps
        ts = few_step_timesteps(K, self.first_timestep, self.num_train_timesteps)
        if backprop_steps is not None and not 1 <= backprop_steps <= K:
            raise ValueError(f"backprop_steps must be in [1, {K}] or None")
        B = z.shape[0]
        if guidance_scale > 1.0 and uncond is None:
            uncond = self.encode_uncond(B)
        ac = self.alphas_cumprod.to(z.device)
        x = z.float()
        outs = []
        for k, t in enumerate(ts):
            if backprop_steps is not None and k == K - backprop_steps:
                x = x.detach()
            tb = torch.full((B,), t, dtype=torch.long, device=z.device)
            if guidance_scale > 1.0:
                pu = self.predict(x, tb, uncond, unet=unet).float()
                pc = self.predict(x, tb, cond, unet=unet).float()
                pred = pu + guidance_scale * (pc - pu)
            else:
                pred = self.predict(x, tb, cond, unet=unet)
            x0, eps = self.x0_eps(x, t, pred)
            outs.append(x0)
            if k < K - 1:
                t_next = ts[k + 1]
                eta_t = torch.as_tensor(eta, dtype=torch.float32)
                noise = None
                if bool((eta_t > 0).any()):
                    noise = torch.randn(z.shape, generator=generator).to(z.device)
                x = ddim_random_eta_step(x0, eps, ac[t], ac[t_next], eta_t.to(z.device), noise)
        return outs

    def encode_uncond(self, batch_size: int) -> dict[str, Any]:
        """Unconditional conditioning for B rows: the empty prompt (SD, diffusers' CFG default) or, for SDXL with
        ``force_zeros_for_empty_prompt``, zero prompt and pooled embeddings (time_ids kept)."""
        cond = self.encode_prompt([""])
        if self.family == "sdxl" and getattr(self.pipe.config, "force_zeros_for_empty_prompt", False):
            cond = {k: (torch.zeros_like(v) if k in ("encoder_hidden_states", "text_embeds") else v)
                    for k, v in cond.items()}
        return {k: (v.expand(batch_size, *v.shape[1:]).contiguous() if isinstance(v, torch.Tensor) else v)
                for k, v in cond.items()}

    def latent_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        """(B, C, h, w) of the generator's latents at the adapter's resolution."""
        vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        h = self.resolution // vae_scale
        return (batch_size, int(self.denoiser().config.in_channels), h, h)

    def initial_noise(self, batch_size: int, generator=None) -> torch.Tensor:
        """z (B, C, h, w) drawn exactly as the Diffusers pipelines do (``randn_tensor``; a list of generators gives
        one draw per row), so the in-memory sampler and the exported pipeline see the same noise."""
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(self.latent_shape(batch_size), generator=generator, device=self.device,
                            dtype=torch.float32)

    @torch.no_grad()
    def sample(self, prompts: list[str], num_inference_steps: int | None = None, guidance_scale: float = 0.0,
               generator=None, batch_size: int = 16, eta: float | None = None, **kwargs) -> torch.Tensor:
        """Images ``(N, 3, H, W)`` in [0, 1] from the few-step generator (eval mode, no grad).

        Args:
            prompts: N prompts. num_inference_steps: K (default: the configured K; same t₀).
            guidance_scale: CFG scale (> 1 only; generators are normally sampled without CFG).
            generator: a torch.Generator or a list of N (one per row, as the trainer's validation passes).
            eta: inference η (default :attr:`eta_inference`).
        """
        unet = self.denoiser()
        was_training = unet.training
        unet.eval()
        # a full fine-tune keeps the trained UNet in fp32 beside half-precision frozen parts: run under autocast,
        # as training does (the sampler's own arithmetic stays fp32)
        half = self.weight_dtype in (torch.float16, torch.bfloat16)
        try:
            out = []
            for i in range(0, len(prompts), batch_size):
                chunk = list(prompts[i:i + batch_size])
                gen = generator[i:i + batch_size] if isinstance(generator, list) else generator
                z = self.initial_noise(len(chunk), gen)
                cond = self.encode_prompt(chunk)
                g_eta = gen[0] if isinstance(gen, list) else gen
                with torch.autocast(self.device.type, dtype=self.weight_dtype, enabled=half):
                    x0 = self.generate_latents(z, cond, unet=unet, eta=self.eta_inference if eta is None else eta,
                                               generator=g_eta, guidance_scale=guidance_scale,
                                               num_steps=num_inference_steps)[-1]
                out.append(self.decode(x0).float().cpu())
            return torch.cat(out)
        finally:
            unet.train(was_training)

    # -- export ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def export_unet(self, base_unet: torch.nn.Module | None = None) -> torch.nn.Module:
        """The generator UNet for export, without peft layers.

        Full fine-tune: the trained (fp32) UNet itself. LoRA: W + ΔW with ΔW computed in fp32
        (:func:`genalign.pipelines.lora.lora_delta`) and added to ``base_unet``'s fp32 weights — a fresh fp32 load
        of the base, so (merged − base) is exactly the LoRA delta even when training held the base in bf16/fp16 —
        or, without ``base_unet``, to the in-memory base upcast to fp32 (:func:`~genalign.pipelines.lora.merged_base_state`).
        ``base_unet`` is modified in place and returned.
        """
        unet = self.denoiser()
        if self.lora is None:
            return unet
        if base_unet is None:
            fresh = type(unet).from_config(unet.config)
            fresh.load_state_dict(merged_base_state(unet))
            return fresh.float()
        params = dict(base_unet.named_parameters())
        for name, layer in lora_layers(unet):
            w = params[f"{name}.weight"]
            w.data = w.data.to(torch.float32) + lora_delta(layer).to(w.device)
        return base_unet.float()

    def export_schedule(self, cfg=None) -> tuple[int, int, float]:
        """(K, t₀, η) of the export: the run config's objective (``num_steps``, ``first_timestep`` /
        ``init_timestep``, ``eta_inference``) when given, else the adapter's."""
        obj = dict(getattr(cfg.objective, "model_extra", None) or {}) if cfg is not None else {}
        K = int(obj.get("num_steps", self.num_steps))
        t0 = int(obj.get("first_timestep", obj.get("init_timestep", self.first_timestep)))
        return K, t0, float(obj.get("eta_inference", self.eta_inference))

    def write_export(self, tmp_dir: str | Path, cfg=None) -> None:
        """Write a vanilla Diffusers pipeline folder that generates in K steps (see module docstring).

        With ``cfg`` the frozen components come from a fresh fp32 load of ``cfg.pipeline`` (the originals, not the
        half-precision copies of a bf16/fp16 run) and the UNet is :meth:`export_unet` on that load's fp32 UNet;
        without it, the in-memory pipeline is saved with :meth:`export_unet` (a warning names half-precision parts).
        Also writes ``few_step.json`` (K, t₀, timesteps, η, the call to use). Load with
        ``DiffusionPipeline.from_pretrained(dir)`` and call ``pipe(prompt, num_inference_steps=K, guidance_scale=0.0)``.

        Raises:
            WeightsNotFoundError: ``cfg.pipeline.model`` cannot be reloaded.
        """
        K, t0, eta = self.export_schedule(cfg)
        sched = few_step_scheduler(dict(self.pipe.scheduler.config), K, t0)
        tmp_dir = Path(tmp_dir)
        if cfg is not None:
            pipe = load_pipeline_from_config(cfg.pipeline)
            pipe.unet = self.export_unet(pipe.unet)
        else:
            pipe = self.pipe
            half = [k for k, v in pipe.components.items() if isinstance(v, torch.nn.Module) and k != "unet"
                    and any(p.dtype in (torch.float16, torch.bfloat16) for p in v.parameters())]
            if half:
                logger.warning("few_step export without the run config saves %s in half precision; export through "
                               "genalign.export to save the fp32 originals", ", ".join(half))
        old_unet, old_sched = pipe.unet, pipe.scheduler
        try:
            if cfg is None:
                pipe.unet = self.export_unet()
            pipe.scheduler = sched
            pipe.save_pretrained(str(tmp_dir))
        finally:
            pipe.unet, pipe.scheduler = old_unet, old_sched
        info = {"num_inference_steps": K, "first_timestep": t0, "timesteps": few_step_timesteps(K, t0),
                "eta": eta, "guidance_scale": 0.0,
                "call": f"pipe(prompt, num_inference_steps={K}, guidance_scale=0.0, eta={eta})",
                "scheduler": "DDIMScheduler (trailing, num_train_timesteps=t0+1, truncated trained_betas, "
                             "set_alpha_to_one) — reproduces genalign's few-step sampler exactly at eta=0"}
        (tmp_dir / FEW_STEP_FILE).write_text(json.dumps(info, indent=2))

    def model_card_extra(self, cfg) -> str:
        """Markdown appended to the exported model card: how to sample in K steps, and which objective values are
        verified and which are reconstructions (the objective class's ``provenance``)."""
        obj = dict(getattr(cfg.objective, "model_extra", None) or {})
        K, t0, eta = self.export_schedule(cfg)
        lines = ["", f"## Few-step sampling ({K} step{'s' if K > 1 else ''})", "", "```python",
                 "from diffusers import DiffusionPipeline", "pipe = DiffusionPipeline.from_pretrained('<this folder>')",
                 f"image = pipe(prompt, num_inference_steps={K}, guidance_scale=0.0, eta={eta}).images[0]", "```", "",
                 f"Timesteps {few_step_timesteps(K, t0)} (vanilla `DDIMScheduler`, trailing spacing over the first "
                 f"{t0 + 1} training steps, final ᾱ = 1); details in `{FEW_STEP_FILE}`.", ""]
        try:  # the objective class's tags, looked up generically by name (no method is named here)
            prov = getattr(OBJECTIVES.get(cfg.objective.name), "provenance", {})
        except KeyError:
            prov = {}
        if prov:
            lines += ["## Which values are verified", "",
                      "No official training code exists for this method; values are tagged [card]/[code]/[paper] "
                      "(verified in the cited source) or [recon]/[unknown → rec.] (reconstructions / genalign's "
                      "recommendations).", "", "| field | value | status |", "|---|---|---|"]
            for k, tag in prov.items():
                lines.append(f"| {k} | {obj.get(k, '')} | {tag} |")
            lines.append("")
        return "\n".join(lines)


class FewStepSDAdapter(FewStepMixin, SDAdapter):
    """Few-step generator over an SD 1.x / 2.x UNet (and builtin:digits, tiny:sd)."""

    family = "sd"


class FewStepSDXLAdapter(FewStepMixin, SDXLAdapter):
    """Few-step generator over an SDXL UNet (e.g. DMD2-SDXL 1-step at t₀ = 399)."""

    family = "sdxl"


@PIPELINES.register("few_step", "One-step / few-step generator from an SD or SDXL UNet (DI*, R0); K-step DDIM export")
class FewStepAdapter(FewStepMixin, DiffusionAdapter):
    """Registry entry: :meth:`from_config` returns a :class:`FewStepSDAdapter` or :class:`FewStepSDXLAdapter`
    depending on the loaded pipeline (``StableDiffusionXLPipeline`` → SDXL)."""

    @classmethod
    def from_config(cls, cfg, device="cpu", weight_dtype=torch.float32) -> DiffusionAdapter:
        """Load ``cfg.model`` (any SD / SDXL folder, hub id, ``builtin:digits``, ``tiny:sd``, ``tiny:sdxl``).

        Raises:
            ValueError: the pipeline is neither SD nor SDXL. WeightsNotFoundError: the model is unavailable.
        """
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        pipe = load_pipeline_from_config(cfg)
        if isinstance(pipe, StableDiffusionXLPipeline):
            klass = FewStepSDXLAdapter
        elif isinstance(pipe, StableDiffusionPipeline):
            klass = FewStepSDAdapter
        else:
            raise ValueError(f"pipeline.name few_step: {cfg.model!r} loads a {type(pipe).__name__}; "
                             "expected a StableDiffusionPipeline or StableDiffusionXLPipeline")
        return klass(pipe, lora=cfg.lora, reference=cfg.reference, device=device, weight_dtype=weight_dtype,
                     gradient_checkpointing=cfg.gradient_checkpointing, attention=cfg.attention,
                     resolution=cfg.resolution)


def build_few_step(pipe, **kwargs) -> DiffusionAdapter:
    """Wrap an already-loaded SD / SDXL pipeline (tests, scripts); ``kwargs`` as :class:`DiffusionAdapter`."""
    from diffusers import StableDiffusionXLPipeline

    klass = FewStepSDXLAdapter if isinstance(pipe, StableDiffusionXLPipeline) else FewStepSDAdapter
    return klass(pipe, **kwargs)


__all__: Sequence[str] = ["FewStepAdapter", "FewStepMixin", "FewStepSDAdapter", "FewStepSDXLAdapter",
                          "build_few_step", "few_step_scheduler", "few_step_timesteps", "x0_from_noise",
                          "require_few_step", "load_unet_weights"]
