"""ControlNet adapter: a frozen SD 1.x/2.x or SDXL base plus a trainable Diffusers ``ControlNetModel``.

Only the ControlNet trains (ControlNet / ControlNet++ / Ctrl-U recipes: frozen UNet, VAE and text encoders). The
condition image travels in the conditioning dict under ``"controlnet_cond"`` (``(B, 3, H, W)`` in [0, 1], no
normalisation — ctrl_u.md §5), so objectives keep calling ``model.predict(x_t, t, cond)``::

    down, mid = controlnet(z_t, t, encoder_hidden_states=h, controlnet_cond=c, return_dict=False)
    eps = unet(z_t, t, encoder_hidden_states=h, down_block_additional_residuals=down,
               mid_block_additional_residual=mid).sample

The ControlNet is initialised from the base UNet (``ControlNetModel.from_unet``: encoder copied, zero
convolutions, so at step 0 the pipeline reproduces the base model exactly) or loaded from an existing ControlNet
checkpoint (:meth:`ControlNetAdapter.set_controlnet`). A base folder that already is a ControlNet pipeline (e.g.
a previous genalign export) brings its own ControlNet.

Export (:meth:`ControlNetAdapter.write_export`): one folder that is a complete
``StableDiffusion(XL)ControlNetPipeline`` (``DiffusionPipeline.from_pretrained(dir)``) whose ``controlnet/``
subfolder loads on its own with vanilla ``ControlNetModel.from_pretrained(dir / "controlnet")``.

Source: Diffusers ``ControlNetModel`` / ``StableDiffusionControlNetPipeline`` /
``StableDiffusionXLControlNetPipeline``; ``examples/controlnet/train_controlnet.py`` (the forward above);
Ctrl-U ``train/ctrlu-reward.py`` (same forward).
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import torch

from genalign.pipelines.base import DiffusionAdapter, load_pipeline_from_config
from genalign.pipelines.schedule import x0_from_prediction
from genalign.registry import pipelines as PIPELINES
from genalign.rewards.base import WeightsNotFoundError

logger = logging.getLogger(__name__)

#: Diffusers' default ControlNet condition-embedding widths (three stride-2 convs = SD's VAE factor 8).
SD_COND_CHANNELS = (16, 32, 96, 256)


def conditioning_channels_for(vae_scale_factor: int) -> tuple[int, ...]:
    """Condition-embedding widths whose number of stride-2 convs matches the VAE's downsampling.

    ``ControlNetConditioningEmbedding`` downsamples by 2 per entry after the first, and its output is *added* to
    the latents, so the pixel condition must land exactly on the latent grid: factor 8 (SD/SDXL) → Diffusers'
    default ``(16, 32, 96, 256)``; factor 1 (the one-block tiny / digits VAE) → ``(16,)``.

    Args:
        vae_scale_factor: pixels per latent cell, a power of two in {1, 2, 4, 8}.

    Raises:
        ValueError: another factor.
    """
    n = int(round(math.log2(vae_scale_factor))) if vae_scale_factor > 0 else -1
    if n < 0 or 2 ** n != vae_scale_factor or n > 3:
        raise ValueError(f"VAE scale factor must be 1, 2, 4 or 8 for a ControlNet, got {vae_scale_factor}")
    return SD_COND_CHANNELS[: n + 1]


def controlnet_from_unet(unet, vae_scale_factor: int = 8, conditioning_channels: int = 3):
    """``ControlNetModel.from_unet`` with condition-embedding widths matched to the VAE (see
    :func:`conditioning_channels_for`). Zero-initialised output convs: the residuals are exactly 0 at init."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels_for(vae_scale_factor),
                                     conditioning_channels=conditioning_channels)


def load_controlnet(path: str):
    """``ControlNetModel.from_pretrained(path)`` (folder or hub id) with a clear offline error.

    Raises:
        WeightsNotFoundError: not a local folder and not downloadable.
    """
    from diffusers import ControlNetModel

    try:
        return ControlNetModel.from_pretrained(path)
    except (OSError, ValueError, EnvironmentError) as err:
        if Path(path).is_dir():
            raise
        raise WeightsNotFoundError(
            f"controlnet init: cannot load {path!r} ({type(err).__name__}: {str(err).splitlines()[0][:160]}). Provide "
            "a local ControlNet folder (e.g. `huggingface-cli download lllyasviel/control_v11p_sd15_seg --local-dir "
            "DIR` on a machine with network) or initialise from the UNet (init_controlnet: unet)."
        ) from None


def build_controlnet_pipeline(base_pipe, controlnet):
    """Wrap a loaded SD / SDXL text-to-image pipeline's components and a ControlNet into the matching Diffusers
    ControlNet pipeline (``StableDiffusionControlNetPipeline`` or ``StableDiffusionXLControlNetPipeline``).

    ``base_pipe``: a Diffusers pipeline or a dict of its components (a ``controlnet`` entry is ignored)."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    comps = base_pipe if isinstance(base_pipe, dict) else base_pipe.components
    comps = {k: v for k, v in comps.items() if k != "controlnet"}
    if "text_encoder_2" in comps:
        keep = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
        pipe = StableDiffusionXLControlNetPipeline(controlnet=controlnet, **{k: comps[k] for k in keep})
    else:
        keep = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
        pipe = StableDiffusionControlNetPipeline(controlnet=controlnet, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False, **{k: comps[k] for k in keep})
    return pipe


def tiny_controlnet_pipeline(sdxl: bool = False, seed: int = 0):
    """A tiny random ``StableDiffusion(XL)ControlNetPipeline`` (8x8 pixels = 4x8x8 latents, condition embedding
    without downsampling) for tests; the ControlNet is ``from_unet`` of the tiny UNet."""
    from genalign.pipelines import tiny

    base = tiny.tiny_sdxl_pipeline(seed=seed) if sdxl else tiny.tiny_sd_pipeline(seed=seed)
    return build_controlnet_pipeline(base, controlnet_from_unet(base.unet, vae_scale_factor=1))


@PIPELINES.register("controlnet", "ControlNet over a frozen SD 1.x/2.x or SDXL base; only the ControlNet trains")
class ControlNetAdapter(DiffusionAdapter):
    """Adapter over a Diffusers ControlNet pipeline: frozen base (UNet, VAE, text encoder(s)), trainable ControlNet.

    Conditioning dict (B rows): ``encoder_hidden_states`` (B, L, D); ``controlnet_cond`` (B, 3, H, W) in [0, 1]
    at pixel resolution; SDXL also ``text_embeds`` (B, P) and ``time_ids`` (B, 6).

    Args:
        pipe: a loaded SD / SDXL pipeline, or a ControlNet pipeline (its ``controlnet`` is then the init).
        controlnet: an explicit ``ControlNetModel`` to train (overrides ``pipe.controlnet``); None = the pipe's
            own, else ``from_unet``.
        lora: must be None (ControlNet recipes train the whole ControlNet).
        reference: ignored (ControlNet objectives have no reference model, methods README §4).
        conditioning_scale: multiplier of the ControlNet residuals in training and sampling (Diffusers
            ``controlnet_conditioning_scale``; 1.0 in every official recipe).
        device, weight_dtype, gradient_checkpointing, attention, resolution: as :class:`DiffusionAdapter`
            (``weight_dtype`` applies to the frozen UNet and text encoders; the ControlNet stays fp32).

    Raises:
        ValueError: ``lora`` is set.
    """

    family = "controlnet"

    def __init__(self, pipe, controlnet=None, lora=None, reference: str = "frozen_copy", device="cpu",
                 weight_dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False,
                 attention: str = "sdpa", resolution: int | None = None, conditioning_scale: float = 1.0):
        from diffusers import DDPMScheduler

        if lora is not None:
            raise ValueError("pipeline.lora must be null for pipeline 'controlnet': the ControlNet is trained in full "
                             "and the base UNet stays frozen (set `pipeline.lora: null`)")
        self.device = torch.device(device)
        self.weight_dtype = weight_dtype
        self.lora = None
        self.ref_unet = None
        self.conditioning_scale = float(conditioning_scale)
        self.sdxl = "text_encoder_2" in pipe.components
        cn = controlnet if controlnet is not None else getattr(pipe, "controlnet", None)
        vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        self.vae_scale_factor = vae_scale
        if cn is None:
            cn = controlnet_from_unet(pipe.unet, vae_scale_factor=vae_scale)
        self.pipe = build_controlnet_pipeline(pipe, cn)
        self.unet, self.vae = self.pipe.unet, self.pipe.vae
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.num_train_timesteps = int(self.noise_scheduler.config.num_train_timesteps)
        self.resolution = resolution or int(self.unet.config.sample_size) * vae_scale
        self.pipe.set_progress_bar_config(disable=True)
        self._setup_frozen_and_attention(weight_dtype, attention)
        self._gradient_checkpointing = gradient_checkpointing
        self._attention = attention
        self._install_controlnet(cn)

    def _install_controlnet(self, cn) -> None:
        cn = cn.to(self.device) if next(cn.parameters()).dtype == torch.float32 else cn.to(self.device, torch.float32)
        cn.requires_grad_(True)
        cn.train()
        if self._gradient_checkpointing:
            cn.enable_gradient_checkpointing()
        if self._attention == "xformers":
            cn.enable_xformers_memory_efficient_attention()
        self.controlnet = cn  # the network training forwards go through (the Accelerate wrapper once prepared)
        self._raw_controlnet = cn  # the unwrapped ControlNet (:meth:`denoiser`)
        self.pipe.controlnet = cn

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg, device="cpu", weight_dtype=torch.float32) -> "ControlNetAdapter":
        """Build from a :class:`genalign.config.PipelineConfig`: the base (``builtin:digits``, ``tiny:sd``,
        ``tiny:sdxl``, a folder or hub id; a ControlNet pipeline folder keeps its ControlNet) with a ControlNet
        ``from_unet``. A ControlNet checkpoint to start from is set by the objective (``init_controlnet``).

        Raises:
            WeightsNotFoundError: base model unavailable. ValueError: ``pipeline.lora`` is set.
        """
        pipe = load_pipeline_from_config(cfg)
        return cls(pipe, lora=cfg.lora, device=device, weight_dtype=weight_dtype,
                   gradient_checkpointing=cfg.gradient_checkpointing, attention=cfg.attention,
                   resolution=cfg.resolution)

    def set_controlnet(self, init: str | None) -> None:
        """Replace the trained ControlNet: ``None`` / ``"pipeline"`` keep the current one, ``"unet"`` re-creates it
        with ``ControlNetModel.from_unet``, anything else is a ControlNet folder / hub id
        (``ControlNetModel.from_pretrained``). Call before the optimizer is built.

        Raises:
            WeightsNotFoundError: checkpoint unavailable. ValueError: its block layout does not fit the UNet.
        """
        if init in (None, "pipeline"):
            return
        if init == "unet":
            cn = controlnet_from_unet(self.unet, vae_scale_factor=self.vae_scale_factor)
        else:
            cn = load_controlnet(init)
            if tuple(cn.config.block_out_channels) != tuple(self.unet.config.block_out_channels):
                raise ValueError(f"controlnet {init!r}: block_out_channels {tuple(cn.config.block_out_channels)} do not "
                                 f"match the base UNet's {tuple(self.unet.config.block_out_channels)}")
        self._install_controlnet(cn)

    # -- verbs ------------------------------------------------------------------------------------------------
    def frozen_modules(self) -> list[torch.nn.Module]:
        """UNet, VAE and text encoder(s): never trained."""
        mods = [self.pipe.vae, self.pipe.text_encoder, self.pipe.unet]
        if self.sdxl:
            mods.append(self.pipe.text_encoder_2)
        return mods

    def denoiser(self) -> torch.nn.Module:
        """The trained network: the ControlNet, unwrapped (never the DDP wrapper); checkpoints load into it."""
        return self._raw_controlnet

    def use_prepared(self, module: torch.nn.Module) -> None:
        """Install the Accelerate-wrapped ControlNet for training forwards (:meth:`predict`)."""
        self.controlnet = module

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The ControlNet's parameters (all of them)."""
        return [p for p in self._raw_controlnet.parameters() if p.requires_grad]

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        """``B`` prompts → ``{"encoder_hidden_states": (B, L, D)}`` (SD) or also ``text_embeds`` (B, P) and
        ``time_ids`` (B, 6) (SDXL, no crop). Add ``controlnet_cond`` (B, 3, H, W) in [0, 1] before :meth:`predict`."""
        if self.sdxl:
            from genalign.pipelines.sdxl import SDXLAdapter

            return SDXLAdapter.encode_prompt(self, prompts)  # same verbs, same pipe API
        embeds, _ = self.pipe.encode_prompt(list(prompts), self.device, 1, False)
        return {"encoder_hidden_states": embeds.float()}

    def pair_extra_cond(self, batch: dict[str, Any]) -> dict[str, Any]:
        """SDXL ``time_ids`` from ``original_sizes`` / ``crop_top_lefts`` when present; nothing for SD."""
        if not self.sdxl or "original_sizes" not in batch:
            return {}
        from genalign.pipelines.sdxl import make_time_ids

        return {"time_ids": make_time_ids(batch["original_sizes"], batch["crop_top_lefts"],
                                          (self.resolution,) * 2).to(self.device)}

    def controlnet_residuals(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any], controlnet=None):
        """ControlNet residuals ``(down: tuple of (N, C_i, h_i, w_i), mid: (N, C, h, w))`` scaled by
        ``conditioning_scale``.

        Raises:
            KeyError: ``cond`` has no ``controlnet_cond``.
        """
        if "controlnet_cond" not in cond:
            raise KeyError("pipeline 'controlnet': the conditioning dict needs 'controlnet_cond' (B, 3, H, W) in [0, 1]")
        cn = controlnet or self.controlnet
        added = self._added(cond)
        down, mid = cn(x_t.float(), t, encoder_hidden_states=cond["encoder_hidden_states"].float(),
                       controlnet_cond=cond["controlnet_cond"].float(), conditioning_scale=self.conditioning_scale,
                       added_cond_kwargs=added and {k: v.float() for k, v in added.items()}, return_dict=False)
        return down, mid

    def _added(self, cond: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        if not self.sdxl:
            return None
        return {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any], unet=None) -> torch.Tensor:
        """Frozen UNet output ``(N, 4, h, w)`` with the ControlNet's residuals for noisy latents ``x_t`` at integer
        timesteps ``t`` (N,); gradients reach the ControlNet only. ``cond`` as in :meth:`encode_prompt` plus
        ``controlnet_cond``."""
        unet = unet or self.unet
        dtype = self.weight_dtype
        down, mid = self.controlnet_residuals(x_t, t, cond)
        added = self._added(cond)
        return unet(x_t.to(dtype), t, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                    down_block_additional_residuals=[d.to(dtype) for d in down],
                    mid_block_additional_residual=mid.to(dtype),
                    added_cond_kwargs=added and {k: v.to(dtype) for k, v in added.items()}).sample

    def x0_from_prediction(self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One-step ẑ0 ``(N, 4, h, w)`` in fp32, closed form without clipping (ctrl_u.md §5): ε-prediction
        ẑ0 = (x_t − sqrt(1−ᾱ_t)ε̂)/sqrt(ᾱ_t), v-prediction ẑ0 = sqrt(ᾱ_t)x_t − sqrt(1−ᾱ_t)v̂
        (:func:`genalign.pipelines.schedule.x0_from_prediction`); ``t`` ``(N,)`` integer timesteps.

        Raises:
            ValueError: another prediction type.
        """
        ab = self.noise_scheduler.alphas_cumprod.to(torch.float32)[t.long().cpu()].to(x_t.device)
        return x0_from_prediction(pred.float(), x_t.float(), ab, self.prediction_type)

    @torch.no_grad()
    def sample(self, prompts: list[str], conditions: torch.Tensor | None = None, num_inference_steps: int = 25,
               guidance_scale: float = 1.0, generator=None, batch_size: int = 16, **kwargs) -> torch.Tensor:
        """Images ``(N, 3, H, W)`` in [0, 1] from the ControlNet pipeline (eval mode, no grad; under autocast when
        the frozen parts are half precision, since the ControlNet stays fp32).

        Args:
            prompts: N prompts.
            conditions: (N, 3, H, W) condition images in [0, 1] (resized by the pipeline to the resolution).
            generator: one generator, or a list of N (one per image, as the trainer's validation passes).

        Raises:
            ValueError: no conditions, or a count that differs from the prompts'.
        """
        if conditions is None or conditions.shape[0] != len(prompts):
            raise ValueError("ControlNet sampling needs one condition image per prompt (conditions=(N, 3, H, W))")
        cn = self._raw_controlnet
        was = cn.training
        cn.eval()
        self.pipe.controlnet = cn
        # frozen parts in half precision, the ControlNet in fp32: autocast runs the mixed forward, as in training
        half = self.weight_dtype in (torch.float16, torch.bfloat16)
        # Accelerate's mixed precision returns the ControlNet's residuals in fp32; the frozen UNet wants its dtype
        hook = cn.register_forward_hook(self._residuals_to_weight_dtype) if half else None
        try:
            out = []
            for i in range(0, len(prompts), batch_size):
                gen = generator[i:i + batch_size] if isinstance(generator, list) else generator
                with torch.autocast(self.device.type, dtype=self.weight_dtype, enabled=half):
                    imgs = self.pipe(prompts[i:i + batch_size],
                                     image=conditions[i:i + batch_size].float().to(self.device),
                                     num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                     generator=gen, output_type="pt", height=self.resolution, width=self.resolution,
                                     controlnet_conditioning_scale=self.conditioning_scale, **kwargs).images
                out.append(imgs.float().cpu())
            return torch.cat(out)
        finally:
            cn.train(was)
            if hook is not None:
                hook.remove()

    def _residuals_to_weight_dtype(self, module, args, out):
        def cast(x):
            if torch.is_tensor(x):
                return x.to(self.weight_dtype) if x.is_floating_point() else x
            if isinstance(x, (list, tuple)) and not hasattr(x, "keys"):
                return type(x)(cast(v) for v in x)
            if hasattr(x, "keys"):  # ControlNetOutput
                for k in list(x.keys()):
                    x[k] = cast(x[k])
            return x

        return cast(out)

    # -- export ---------------------------------------------------------------------------------------------
    def write_export(self, out_dir: str | Path, cfg=None) -> None:
        """Write a complete ControlNet pipeline folder (``DiffusionPipeline.from_pretrained(out_dir)``) whose
        ``controlnet/`` subfolder is a vanilla ``ControlNetModel.from_pretrained`` folder (called by
        :func:`genalign.export.export_pipeline`).

        Mixed precision (issue 13 §2): the trained ControlNet is fp32 and saved as is; the frozen base is taken
        from a fresh fp32 load of ``cfg.pipeline`` (the originals, not the bf16/fp16 copies training used), so
        every component is saved in fp32 and no weight passes through half precision. Without ``cfg`` the
        in-memory base is used, upcast to fp32 once (a warning says its weights were rounded to half precision).
        """
        base = load_pipeline_from_config(cfg.pipeline) if cfg is not None else self._fp32_base_copy()
        build_controlnet_pipeline(base, self._raw_controlnet).save_pretrained(str(out_dir))

    def _fp32_base_copy(self):
        comps = {k: v for k, v in self.pipe.components.items() if k != "controlnet"}
        half = [k for k, v in comps.items() if isinstance(v, torch.nn.Module)
                and any(p.dtype in (torch.float16, torch.bfloat16) for p in v.parameters())]
        if half:
            logger.warning("ControlNet export without the run config: %s saved from half-precision copies (upcast "
                           "to fp32); export through genalign.export to save the fp32 originals", ", ".join(half))
        return {k: (copy.deepcopy(v).float() if k in half else v) for k, v in comps.items()}

    def save_controlnet(self, out_dir: str | Path) -> None:
        """Save the trained ControlNet alone (``ControlNetModel.from_pretrained(out_dir)``)."""
        self._raw_controlnet.save_pretrained(str(out_dir))

    def save_unet(self, out_dir: str | Path) -> None:  # the trained module here is the ControlNet
        """Alias of :meth:`save_controlnet` (the ControlNet is the trained network)."""
        self.save_controlnet(out_dir)
