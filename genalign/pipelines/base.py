"""``DiffusionAdapter``: the few verbs objectives need, over a Diffusers text-to-image pipeline.

An adapter owns the pipeline's components and keeps model-family details (SDXL's two encoders and
micro-conditioning, prediction types) inside itself, so an objective reads the same for SD 1.5 and SDXL::

    cond = model.encode_prompt(prompts)                 # dict of tensors, B rows
    x_t = model.add_noise(x0, noise, t)
    pred = model.predict(x_t, t, cond)                  # UNet output (epsilon / v)
    target = model.target(x0, noise, t)                 # what pred regresses to

Loading: ``builtin:digits`` (shipped), ``tiny:sd`` / ``tiny:sdxl`` (random tiny builders), a local Diffusers
folder, or a hub id (needs network, or the files in the HF cache). LoRA through peft's diffusers integration
(``unet.add_adapter``); the reference model is the same UNet with adapters disabled (default) or a frozen copy.

Source: Diffusers ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` (encode_prompt, schedulers,
``get_velocity``), peft ``LoraConfig``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from genalign.errors import WeightsNotFoundError

logger = logging.getLogger(__name__)


def resolve_model_path(model: str) -> str:
    """``builtin:digits`` / ``builtin:music`` → the shipped folder; other strings are returned unchanged (folder or hub id)."""
    if model == "builtin:digits":
        from genalign.pipelines.digits import digits_base_path

        return str(digits_base_path())
    if model == "builtin:music":
        from genalign.pipelines.music import music_base_path

        return str(music_base_path())
    return model


def hub_offline_reason(timeout_s: float = 3.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached, or None when it may be: ``HF_HUB_OFFLINE`` is set, or a TCP
    connection to the hub's host (``HF_ENDPOINT``, default huggingface.co, port 443) fails within ``timeout_s``
    seconds. Behind an HTTP(S) proxy the direct probe says nothing, so None is returned (the library decides).

    Source: huggingface_hub's ``HF_HUB_OFFLINE`` / ``HF_ENDPOINT`` conventions; the probe is a plain socket connect.
    """
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("0", "", "false", "no", "off"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        return f"no network: cannot reach {host}:{port} ({type(err).__name__})"
    return None


def offline_model_message(field: str, model: str, reason: str) -> str:
    """The one-line message for a hub id that cannot be fetched: the reason and how to give a local folder."""
    return (f"{field}: {model!r} is not a local Diffusers folder nor in the Hugging Face cache, and {reason}. On a machine "
            f"with network run `hf download {model} --local-dir DIR`, copy DIR here and set {field}: DIR")


def load_diffusers_pipeline(model: str, revision: str | None = None, torch_dtype: torch.dtype | None = None,
                            trust_remote_code: bool = False, **kwargs):
    """``DiffusionPipeline.from_pretrained`` with a clear error when the model is unavailable offline.

    A hub id is first looked up in the local Hugging Face cache (``local_files_only``); when it is not there and
    the hub is unreachable (:func:`hub_offline_reason`: ``HF_HUB_OFFLINE`` or no network), the error comes at once
    instead of after the library's retries.

    Raises:
        WeightsNotFoundError: not a local folder and not downloadable; one line saying why (no network,
            ``HF_HUB_OFFLINE``, or the hub's own error) and how to point ``pipeline.model`` at a local folder.
    """
    from diffusers import DiffusionPipeline

    if model.startswith("tiny:"):
        from genalign.pipelines import tiny

        builders = {"tiny:sd": tiny.tiny_sd_pipeline, "tiny:sd-v": lambda: tiny.tiny_sd_pipeline("v_prediction"),
                    "tiny:sdxl": tiny.tiny_sdxl_pipeline}
        if model not in builders:
            raise ValueError(f"pipeline.model: unknown tiny model {model!r}; known: {', '.join(builders)}")
        return builders[model]()
    path = resolve_model_path(model)
    load = dict(revision=revision, torch_dtype=torch_dtype, trust_remote_code=trust_remote_code, **kwargs)
    if os.path.isdir(path):
        return DiffusionPipeline.from_pretrained(path, **load)
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise WeightsNotFoundError(f"pipeline.model: {model!r} is not a Diffusers folder (no such directory) and "
                                   "not a hub id (owner/name)")
    reason = hub_offline_reason()
    if reason is not None:
        try:  # the files may be in the HF cache already
            return DiffusionPipeline.from_pretrained(path, local_files_only=True, **load)
        except (OSError, ValueError, EnvironmentError):
            raise WeightsNotFoundError(offline_model_message("pipeline.model", model, reason)) from None
    try:
        return DiffusionPipeline.from_pretrained(path, **load)
    except (OSError, ValueError, EnvironmentError) as err:
        raise WeightsNotFoundError(
            f"pipeline.model: cannot load {model!r} ({type(err).__name__}: {str(err).splitlines()[0][:160]}). "
            "Provide a local Diffusers folder (`pipeline.model: /path/to/model`, e.g. made with "
            f"`hf download {model} --local-dir DIR` on a machine with network)."
        ) from None


def repeat_cond(cond: dict[str, Any], n: int) -> dict[str, Any]:
    """Repeat every tensor of a conditioning dict ``n`` times along dim 0 (rows [c; c; ...]), recursively."""
    out = {}
    for k, v in cond.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.repeat(n, *([1] * (v.ndim - 1)))
        elif isinstance(v, dict):
            out[k] = repeat_cond(v, n)
        else:
            out[k] = v
    return out


def index_cond(cond: dict[str, Any], idx) -> dict[str, Any]:
    """Select rows ``idx`` of every tensor in a (nested) conditioning dict."""
    return {k: (v[idx] if isinstance(v, torch.Tensor) else index_cond(v, idx) if isinstance(v, dict) else v)
            for k, v in cond.items()}


def cond_to(cond: dict[str, Any], device, dtype=None) -> dict[str, Any]:
    """Move a (nested) conditioning dict to ``device`` (floating tensors also to ``dtype`` when given)."""
    out = {}
    for k, v in cond.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
        elif isinstance(v, dict):
            out[k] = cond_to(v, device, dtype)
        else:
            out[k] = v
    return out


def _to(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a module, casting only when needed (Diffusers warns on every dtype cast)."""
    p = next(module.parameters(), None)
    if p is not None and p.dtype == dtype:
        return module.to(device)
    return module.to(device, dtype=dtype)


def load_pipeline_from_config(cfg):
    """Load ``cfg.model`` (a :class:`genalign.config.PipelineConfig`) with its optional VAE override ``cfg.vae``
    (e.g. ``madebyollin/sdxl-vae-fp16-fix``); every Diffusers adapter builds through this.

    Raises:
        WeightsNotFoundError: the model or the VAE is unavailable; the message says how to provide it.
    """
    kwargs = {}
    if cfg.vae:
        from diffusers import AutoencoderKL

        reason = None if os.path.isdir(cfg.vae) else hub_offline_reason()
        try:  # offline: only the HF cache, at once (no retries)
            kwargs["vae"] = AutoencoderKL.from_pretrained(cfg.vae, local_files_only=reason is not None)
        except OSError as err:
            if reason is not None:
                raise WeightsNotFoundError(offline_model_message("pipeline.vae", cfg.vae, reason)) from None
            raise WeightsNotFoundError(f"pipeline.vae: cannot load {cfg.vae!r}: {str(err).splitlines()[0][:160]}. "
                                       "Provide a local folder or allow network access.") from None
    pipe = load_diffusers_pipeline(cfg.model, cfg.revision, trust_remote_code=cfg.trust_remote_code, **kwargs)
    if "vae" in kwargs and cfg.model.startswith("tiny:"):  # tiny builders take no kwargs: swap it in afterwards
        pipe.vae = kwargs["vae"]
    return pipe

class DiffusionAdapter:
    """Base adapter over a Diffusers text-to-image pipeline (subclasses: :class:`~genalign.pipelines.sd.SDAdapter`,
    :class:`~genalign.pipelines.sdxl.SDXLAdapter`).

    Args:
        pipe: a loaded Diffusers pipeline (its ``unet`` is the trained network).
        lora: a :class:`genalign.config.LoraConfig` or ``None`` for full fine-tuning.
        reference: "adapter_off" (LoRA disabled), "frozen_copy", or "none" (reference-free objectives).
        device, weight_dtype: where and in which dtype the frozen parts live (trainable LoRA params stay fp32).
        gradient_checkpointing, attention: memory / speed options ("sdpa" default, "xformers" if installed).

    Raises:
        ValueError: ``reference="adapter_off"`` without LoRA (there is no adapter to switch off).
        ImportError: ``attention="xformers"`` without xformers installed.
    """

    family = "base"
    lora_folded = False  # set by fold_lora: the base weights carry folded LoRA deltas

    def __init__(self, pipe, lora=None, reference: str = "adapter_off", device: str | torch.device = "cpu",
                 weight_dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False,
                 attention: str = "sdpa", resolution: int | None = None):
        from diffusers import DDPMScheduler

        self.pipe = pipe
        self.device = torch.device(device)
        self.weight_dtype = weight_dtype
        self.unet = pipe.unet  # the network forwards go through (the Accelerate wrapper once prepared)
        self.vae = pipe.vae
        self.lora = lora
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.num_train_timesteps = int(self.noise_scheduler.config.num_train_timesteps)
        vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = resolution or int(self.unet.config.sample_size) * vae_scale
        pipe.set_progress_bar_config(disable=True)
        self._setup_frozen_and_attention(weight_dtype, attention)
        self.ref_unet = None
        if reference == "frozen_copy":
            self.ref_unet = _to(copy.deepcopy(self.unet).requires_grad_(False).eval(), self.device, weight_dtype)
        elif lora is None and reference == "adapter_off":
            raise ValueError("pipeline.reference: 'adapter_off' needs LoRA (pipeline.lora); use 'frozen_copy' (or "
                             "'none' for reference-free objectives such as MaPO) for full fine-tuning")
        self.reference_kind = reference
        if lora is not None:
            from peft import LoraConfig as PeftLoraConfig

            self.unet.requires_grad_(False)
            _to(self.unet, self.device, weight_dtype)
            self.unet.add_adapter(PeftLoraConfig(
                r=lora.rank, lora_alpha=lora.alpha or lora.rank, init_lora_weights=lora.init if lora.init == "gaussian" else True,
                target_modules=list(lora.target_modules), lora_dropout=lora.dropout,
            ))
            for p in self.unet.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            _to(self.unet, self.device, torch.float32).requires_grad_(True)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.train()

    def _setup_frozen_and_attention(self, weight_dtype: torch.dtype, attention: str) -> None:
        """Freeze and place the frozen modules (VAE in fp32: the SD/SDXL VAE in fp16 gives NaNs), and pick the
        UNet attention backend (SDPA default; xformers only when installed)."""
        for m in self.frozen_modules():
            m.requires_grad_(False)
            m.eval()
        _to(self.vae, self.device, torch.float32)
        for m in self.frozen_modules():
            if m is not self.vae:
                _to(m, self.device, weight_dtype)
        if attention == "xformers":
            try:
                import xformers  # noqa: F401
            except ImportError:
                raise ImportError("pipeline.attention: 'xformers' asked for but not installed (pip install genalign[gpu])") from None
            self.unet.enable_xformers_memory_efficient_attention()

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg, device="cpu", weight_dtype=torch.float32) -> "DiffusionAdapter":
        """Build from a :class:`genalign.config.PipelineConfig` (loads the model, optional VAE override)."""
        pipe = load_pipeline_from_config(cfg)
        return cls(pipe, lora=cfg.lora, reference=cfg.reference, device=device, weight_dtype=weight_dtype,
                   gradient_checkpointing=cfg.gradient_checkpointing, attention=cfg.attention,
                   resolution=cfg.resolution)

    # -- verbs ------------------------------------------------------------------------------------------------
    def frozen_modules(self) -> list[torch.nn.Module]:
        """Modules never trained (VAE, text encoders)."""
        return [self.vae]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters the optimizer updates (LoRA weights, or the whole UNet)."""
        return [p for p in self.denoiser().parameters() if p.requires_grad]

    def denoiser(self) -> torch.nn.Module:
        """The trained network, unwrapped (never the DDP/FSDP wrapper): for reference passes, sampling, snapshots,
        LoRA folding and export."""
        raw = getattr(self, "_raw_unet", None)  # set by use_prepared
        return raw if raw is not None else self.unet

    def use_prepared(self, module: torch.nn.Module) -> None:
        """Install the Accelerate-wrapped trained network for training forwards (:meth:`predict` without ``unet``)."""
        if getattr(self, "_raw_unet", None) is None:
            self._raw_unet = self.unet
        self.unet = module

    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        """Text conditioning for ``B`` prompts, as a dict passed to :meth:`predict` (implemented per family)."""
        raise NotImplementedError(f"{type(self).__name__} must implement encode_prompt (one per model family)")

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] → scaled latents ``(B, 4, H/f, W/f)`` (posterior sample · scaling_factor)."""
        x = images.to(self.device, torch.float32) * 2 - 1
        latents = self.vae.encode(x).latent_dist.sample(generator=generator)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images ``(B, 3, H, W)`` in [0, 1] (differentiable)."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        x = self.vae.decode(latents.float() / self.vae.config.scaling_factor + shift).sample
        return (x / 2 + 0.5).clamp(0, 1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε (``DDPMScheduler.add_noise``)."""
        return self.noise_scheduler.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Regression target: ε for epsilon-prediction, v = sqrt(ᾱ)ε − sqrt(1−ᾱ)x0 for v-prediction.

        Raises:
            ValueError: an unsupported prediction type (e.g. "sample").
        """
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(x0, noise, t)
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r} (epsilon or v_prediction)")

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any], unet=None) -> torch.Tensor:
        """UNet output ``(N, 4, h, w)`` for noisy latents ``x_t`` at integer timesteps ``t`` ``(N,)``."""
        unet = unet or self.unet
        dtype = self.weight_dtype
        extra = {k: v for k, v in cond.items() if k != "encoder_hidden_states"}
        return unet(x_t.to(dtype), t, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype), **extra).sample

    @contextlib.contextmanager
    def reference(self) -> Iterator[Any]:
        """Context yielding the reference network: the UNet with LoRA disabled, or the frozen copy (no grad)."""
        if self.reference_kind == "none":
            raise RuntimeError("pipeline.reference is 'none' but the objective asked for a reference model")
        with torch.no_grad():
            if self.ref_unet is not None:
                yield self.ref_unet
                return
            unet = self.denoiser()  # never the DDP wrapper (README §4)
            unet.disable_adapters()
            try:
                yield unet
            finally:
                unet.enable_adapters()

    @contextlib.contextmanager
    def skip_zero_adapters(self) -> Iterator[None]:
        """Run the block with LoRA adapters disabled when every LoRA up-projection is still zero (a fresh adapter adds
        exactly nothing, so sampling the base weights alone gives the same samples, faster); otherwise a no-op."""
        net = self.denoiser()
        ups = [p for n, p in net.named_parameters() if "lora_B" in n]
        if not ups or any(bool(p.detach().ne(0).any()) for p in ups):
            yield
            return
        net.disable_adapters()
        try:
            yield
        finally:
            net.enable_adapters()

    @torch.no_grad()
    def sample(self, prompts: list[str], num_inference_steps: int = 25, guidance_scale: float = 1.0,
               generator: torch.Generator | None = None, batch_size: int = 16, **kwargs) -> torch.Tensor:
        """Generate images ``(N, 3, H, W)`` in [0, 1] with the pipeline's own sampler (eval mode, no grad)."""
        was_training = self.unet.training
        self.unet.eval()
        # Half-precision frozen parts beside the fp32 VAE (and fp32 LoRA / trained UNet): autocast runs the mixed
        # pipeline as training does; without it the bf16 latents reach the fp32 VAE and the decode fails.
        half = self.weight_dtype in (torch.float16, torch.bfloat16)
        try:
            out = []
            for i in range(0, len(prompts), batch_size):
                with torch.autocast(self.device.type, dtype=self.weight_dtype, enabled=half):
                    imgs = self.pipe(prompts[i:i + batch_size], num_inference_steps=num_inference_steps,
                                     guidance_scale=guidance_scale, generator=generator, output_type="pt",
                                     height=self.resolution, width=self.resolution, **kwargs).images
                out.append(imgs.float().cpu())
            return torch.cat(out)
        finally:
            self.unet.train(was_training)

    def pair_extra_cond(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Per-example conditioning beyond text (SDXL micro-conditioning); none for SD."""
        return {}

    def save_unet(self, out_dir: str | Path) -> None:
        """Save the trained UNet (full fine-tune) in Diffusers format."""
        self.denoiser().save_pretrained(out_dir)

    def fold_lora(self, lora_state: dict[str, torch.Tensor] | None = None, reset: bool = True) -> int:
        """Fold the LoRA into the base weights in fp32 (:func:`genalign.pipelines.lora.merge_lora_into_base`) and
        record it: from then on :meth:`write_export` writes the merged network (no "base + one LoRA" form exists).
        Self-play round switches (DDO) use it. Returns the number of LoRA layers folded."""
        from genalign.pipelines.lora import merge_lora_into_base

        init = getattr(self.lora, "init", "gaussian")
        count = merge_lora_into_base(self.denoiser(), lora_state, reset, init if init == "gaussian" else True)
        self.lora_folded = self.lora_folded or count > 0
        return count

    def write_export(self, out_dir: str | Path, cfg) -> None:
        """Write a complete Diffusers pipeline folder for the trained model into the (empty, temporary) ``out_dir``.

        With LoRA: ``pytorch_lora_weights.safetensors`` plus a fresh fp32 base pipeline with that file loaded,
        fused and unloaded through vanilla Diffusers (so the exported LoRA is proven loadable by Diffusers
        itself, and the fold happens in fp32). Full fine-tune: the pipeline with the trained UNet.
        Adapters with another layout (ControlNet, few-step, audio) override this.

        Raises:
            WeightsNotFoundError: the base model cannot be reloaded for the merge.
        """
        import shutil

        out_dir = Path(out_dir)
        unet = self.denoiser()
        if self.lora_folded:  # LoRA folded into the base (fold_lora): the merged network, in fp32
            from genalign.pipelines.lora import write_merged_export

            write_merged_export(self.pipe, unet, "unet", out_dir)
            return
        if cfg.pipeline.lora is None:
            self.pipe.unet = unet
            self.pipe.save_pretrained(str(out_dir))
            return
        lora_dir = out_dir / "_lora"
        type(self.pipe).save_lora_weights(str(lora_dir), unet_lora_layers=lora_state_dict(unet),
                                          safe_serialization=True)
        base = load_pipeline_from_config(cfg.pipeline)
        base.load_lora_weights(str(lora_dir))
        base.fuse_lora()
        base.unload_lora_weights()
        base.save_pretrained(str(out_dir))
        shutil.move(str(lora_dir / LORA_FILE), str(out_dir / LORA_FILE))
        shutil.rmtree(lora_dir)

    def model_card_extra(self, cfg) -> str:
        """Markdown appended to the export's model card (few-step usage, value provenance); default: none."""
        return ""


LORA_FILE = "pytorch_lora_weights.safetensors"


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The network's peft LoRA weights in Diffusers' key format (peft ``get_peft_model_state_dict`` +
    diffusers ``convert_state_dict_to_diffusers``), as saved by ``save_lora_weights``."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
