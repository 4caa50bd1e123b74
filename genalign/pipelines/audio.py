"""Text-to-music adapters: Stable Audio Open (``stable_audio``) and AudioLDM2 (``audioldm2``), with tiny builders.

Both expose the verbs objectives use (``encode_prompt``, ``encode``/``decode``, ``add_noise``, ``target``,
``predict``, ``reference``, ``sample``/``sample_latents``) so DDO, DRAGON and the preference objectives read the
same as for images. The trained network is kept under the attribute ``unet`` (the DiT for Stable Audio) so the
trainer's generic hooks apply; ``pipe_denoiser`` names the pipeline attribute it lives in.

**Stable Audio Open** (``StableAudioPipeline``: ``StableAudioDiTModel`` + ``AutoencoderOobleck`` + T5 +
``StableAudioProjectionModel`` for seconds_start / seconds_total). v-objective on the cosine schedule
(dragon.md §5, [recon, checked against ``CosineDPMSolverMultistepScheduler``'s preconditioning]):

    t ∈ (0, 1),  a = cos(πt/2),  s = sin(πt/2),  x_t = a·x0 + s·ε,  v = a·ε − s·x0,  x0 = a·x_t − s·v̂

and the DiT's timestep input is t itself (the scheduler's c_noise = atan(σ)·2/π with σ = tan(πt/2)). Objectives
draw integer timesteps k ~ U{0..T−1} (``num_train_timesteps`` = 1000); this adapter maps them to
t = (k + ½)/T, and also accepts float t ∈ [0, 1] directly. Sampling uses genalign's deterministic DDIM on the
same cosine schedule (``CosineDPMSolverMultistepScheduler`` needs ``torchsde``, which genalign does not require);
``guidance_scale > 1`` builds the unconditional branch as the pipeline does: zero text + seconds cross-attention
states, the global seconds embedding kept (:meth:`StableAudioAdapter.unconditional`).

**AudioLDM2**: :mod:`genalign.pipelines.audioldm2`; shared adapter verbs: :mod:`genalign.pipelines.audio_base`.

Tiny builders (random weights, real classes, CPU in seconds): :func:`tiny_stable_audio_pipeline`,
:func:`tiny_audioldm2_pipeline`; names ``tiny:stable_audio``, ``tiny:audioldm2`` in ``pipeline.model``.

Source: diffusers 0.42 ``pipelines/stable_audio/pipeline_stable_audio.py`` and
``pipelines/audioldm2/pipeline_audioldm2.py`` (conditioning code reused, not re-implemented).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from genalign.pipelines.audio_base import (
    SYNTH_WORDS, AudioAdapterMixin, set_adapters_enabled, timestep_fraction, tiny_t5_encoder, tiny_word_tokenizer,
)
from genalign.pipelines.audioldm2 import AudioLDM2Adapter, audioldm_log_mel, tiny_audioldm2_pipeline
from genalign.pipelines.base import load_diffusers_pipeline, resolve_model_path
from genalign.pipelines.schedule import bcast
from genalign.registry import pipelines as PIPELINES

__all__ = ["SYNTH_WORDS", "tiny_word_tokenizer", "set_adapters_enabled", "tiny_stable_audio_pipeline",
           "cosine_v_objective", "cosine_x0_from_v", "StableAudioAdapter", "AudioLDM2Adapter",
           "tiny_audioldm2_pipeline", "audioldm_log_mel", "load_audio_pipeline", "audio_adapter_for"]


def tiny_stable_audio_pipeline(sample_rate: int = 8_000, latent_channels: int = 8, latent_frames: int = 64,
                               audio_channels: int = 1, seed: int = 0):
    """A ``StableAudioPipeline`` of tiny random components.

    Oobleck VAE with downsampling (4, 4, 4) (hop 64: ``latent_frames`` = 64 frames ↔ 4,096 samples = 0.512 s at
    8 kHz), ``latent_channels`` latent channels; a 2-layer DiT (2 heads × 8, cross-attention 32); a 1-layer T5
    encoder on a word-level tokenizer; the projection model (seconds 0-512). Scheduler: an
    ``EDMDPMSolverMultistepScheduler`` placeholder (the real checkpoint's cosine DPM solver needs ``torchsde``);
    genalign samples with its own cosine DDIM (:meth:`StableAudioAdapter.sample_latents`).
    """
    from diffusers import AutoencoderOobleck, EDMDPMSolverMultistepScheduler, StableAudioDiTModel, StableAudioPipeline
    from diffusers.pipelines.stable_audio import StableAudioProjectionModel

    tok = tiny_word_tokenizer()
    te = tiny_t5_encoder(len(tok), seed=seed)
    torch.manual_seed(seed)
    vae = AutoencoderOobleck(encoder_hidden_size=2 * latent_channels, downsampling_ratios=[4, 4, 4], channel_multiples=[1, 2, 2],
                             decoder_channels=8, decoder_input_channels=latent_channels, audio_channels=audio_channels,
                             sampling_rate=sample_rate)
    proj = StableAudioProjectionModel(text_encoder_dim=32, conditioning_dim=32, min_value=0, max_value=512)
    dit = StableAudioDiTModel(sample_size=latent_frames, in_channels=latent_channels, num_layers=2,
                              attention_head_dim=8, num_attention_heads=2, num_key_value_attention_heads=1,
                              out_channels=latent_channels, cross_attention_dim=32, time_proj_dim=16,
                              global_states_input_dim=64, cross_attention_input_dim=32)
    sched = EDMDPMSolverMultistepScheduler(sigma_min=0.3, sigma_max=500, sigma_data=1.0, prediction_type="v_prediction")
    return StableAudioPipeline(vae=vae, text_encoder=te, projection_model=proj, tokenizer=tok, transformer=dit,
                               scheduler=sched)


def cosine_v_objective(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine-schedule v-objective of Stable Audio Open: ``(x_t, v)`` in fp32 (dragon.md §5).

    a = cos(πt/2), s = sin(πt/2), x_t = a·x0 + s·ε, v = a·ε − s·x0. ``x0``, ``noise``: (B, ...); ``t``: (B,) in
    [0, 1]. Source: [recon, checked against ``CosineDPMSolverMultistepScheduler``'s preconditioning].

    Raises:
        ValueError: shape mismatch, or t outside [0, 1].
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 and noise shapes differ: {tuple(x0.shape)} vs {tuple(noise.shape)}")
    if t.ndim != 1 or t.shape[0] != x0.shape[0]:
        raise ValueError(f"t must have shape ({x0.shape[0]},), got {tuple(t.shape)}")
    if ((t < 0) | (t > 1)).any():
        raise ValueError("t must lie in [0, 1]")
    a, s = torch.cos(0.5 * math.pi * bcast(t, x0)), torch.sin(0.5 * math.pi * bcast(t, x0))
    x0f, nf = x0.to(torch.float32), noise.to(torch.float32)
    return a * x0f + s * nf, a * nf - s * x0f


def cosine_x0_from_v(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 = cos(πt/2)·x_t − sin(πt/2)·v̂ for the cosine v-objective. ``x_t``, ``v``: (B, ...); ``t``: (B,) in [0, 1];
    returns (B, ...) fp32.

    The same formula as :func:`genalign.pipelines.schedule.x0_from_v` with ᾱ = cos²(πt/2), computed from cos and
    sin directly: going through ᾱ in fp32 loses ~1e-4 near t = 1, where ᾱ ≈ 6e-7.

    Raises:
        ValueError: shape mismatch, or ``t`` is not (B,).
    """
    if x_t.shape != v.shape:
        raise ValueError(f"x_t and v shapes differ: {tuple(x_t.shape)} vs {tuple(v.shape)}")
    if t.ndim != 1 or t.shape[0] != x_t.shape[0]:
        raise ValueError(f"t must have shape ({x_t.shape[0]},), got {tuple(t.shape)}")
    a, s = torch.cos(0.5 * math.pi * bcast(t, x_t)), torch.sin(0.5 * math.pi * bcast(t, x_t))
    return a * x_t.to(torch.float32) - s * v.to(torch.float32)


@PIPELINES.register("stable_audio", "Stable Audio Open: DiT + Oobleck VAE, cosine v-objective (text-to-music)")
class StableAudioAdapter(AudioAdapterMixin):
    """Adapter over ``StableAudioPipeline`` (see module docstring).

    Args:
        pipe: a loaded ``StableAudioPipeline``.
        lora: :class:`genalign.config.LoraConfig` (targets the DiT's ``to_q``/``to_k``/``to_v``/``to_out.0``) or None.
        reference: "adapter_off" | "frozen_copy". device, weight_dtype: where / in which dtype frozen parts live.
        audio_seconds: clip length for conditioning and sampling (default: the DiT's full window).
        latent_scale: multiplier applied to VAE latents (1.0 for Stable Audio Open).

    Shapes: waveforms ``(B, C_audio, T)`` at ``sample_rate``; latents ``(B, C, L)`` (64 × 1024 for the real
    model's 47.55 s window); conditioning ``{"encoder_hidden_states": (B, S + 2, D), "global_hidden_states":
    (B, 1, 2D)}``.

    Raises:
        ValueError: ``adapter_off`` without LoRA.
    """

    pipe_denoiser = "transformer"
    prediction_type = "v_prediction"
    num_train_timesteps = 1000

    def __init__(self, pipe, lora=None, reference: str = "adapter_off", device="cpu",
                 weight_dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False,
                 attention: str = "sdpa", resolution: int | None = None, audio_seconds: float | None = None,
                 latent_scale: float = 1.0):
        self.pipe = pipe
        self.vae = pipe.vae
        self.sample_rate = int(pipe.vae.config.sampling_rate)
        self.audio_channels = int(pipe.vae.config.audio_channels)
        self.hop_length = int(pipe.vae.hop_length)
        self.latent_frames = int(pipe.transformer.config.sample_size)
        self.audio_seconds = audio_seconds or self.latent_frames * self.hop_length / self.sample_rate
        self.latent_scale = float(latent_scale)
        self.resolution = None
        self._setup_trainable(pipe.transformer, lora, reference, device, weight_dtype, gradient_checkpointing)

    @classmethod
    def from_config(cls, cfg, device="cpu", weight_dtype=torch.float32) -> "StableAudioAdapter":
        """Build from a :class:`genalign.config.PipelineConfig` (``tiny:stable_audio``, a folder or hub id)."""
        pipe = load_audio_pipeline(cfg.model, cfg.revision, "stable_audio")
        return cls(pipe, lora=cfg.lora, reference=cfg.reference, device=device, weight_dtype=weight_dtype,
                   gradient_checkpointing=cfg.gradient_checkpointing)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.vae, self.pipe.text_encoder, self.pipe.projection_model]

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        """``B`` prompts → DiT conditioning (text + seconds_start / seconds_total projections), fp32."""
        p = self.pipe
        embeds = p.encode_prompt(list(prompts), self.device, False)
        start, end = p.encode_duration(0.0, self.audio_seconds, self.device, False, len(prompts))
        text = torch.cat([embeds, start, end], dim=1)
        glob = torch.cat([start, end], dim=2)
        return {"encoder_hidden_states": text.float(), "global_hidden_states": glob.float()}

    @torch.no_grad()
    def encode(self, waveforms: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Waveforms ``(B, C_audio, T)`` (T a multiple of ``hop_length``) → latents ``(B, C, T/hop)`` (posterior
        sample × ``latent_scale``)."""
        x = waveforms.to(self.device, torch.float32)
        if x.ndim == 2:
            x = x[:, None]
        dist = self.vae.encode(x).latent_dist
        eps = torch.randn(dist.mean.shape, generator=generator).to(dist.mean.device)
        return (dist.mean + dist.std * eps) * self.latent_scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, C, L)`` → waveforms ``(B, C_audio, L·hop)`` clipped to [−1, 1] (differentiable)."""
        return self.vae.decode(latents.float() / self.latent_scale).sample.clamp(-1, 1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = cos(πt/2)·x0 + sin(πt/2)·ε (fp32; integer k → t = (k + ½)/T)."""
        return cosine_v_objective(x0, noise, timestep_fraction(t, self.num_train_timesteps).to(x0.device))[0]

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = cos(πt/2)·ε − sin(πt/2)·x0 (fp32)."""
        return cosine_v_objective(x0, noise, timestep_fraction(t, self.num_train_timesteps).to(x0.device))[1]

    def x0_from_prediction(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 = cos(πt/2)·x_t − sin(πt/2)·v̂."""
        return cosine_x0_from_v(x_t, v, timestep_fraction(t, self.num_train_timesteps).to(x_t.device))

    @staticmethod
    def unconditional(cond: dict[str, Any]) -> dict[str, Any]:
        """CFG's unconditional branch as ``StableAudioPipeline`` builds it without a negative prompt: the
        cross-attention states (text + seconds tokens) zeroed, the global seconds embedding kept (issue 14 item 7)."""
        return {"encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"]),
                "global_hidden_states": cond["global_hidden_states"]}

    def _rotary(self, length: int):
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        return get_1d_rotary_pos_embed(self.pipe.rotary_embed_dim, length + 1, use_real=True,
                                       repeat_interleave_real=False)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any], unet=None) -> torch.Tensor:
        """DiT v-prediction ``(N, C, L)`` at integer (mapped to (k+½)/T) or float timesteps t ``(N,)``."""
        net = unet or self.unet
        tt = timestep_fraction(t, self.num_train_timesteps).to(x_t.device)
        dt = self.weight_dtype
        rot = tuple(r.to(x_t.device) for r in self._rotary(x_t.shape[-1]))
        return net(x_t.to(dt), tt.to(dt), encoder_hidden_states=cond["encoder_hidden_states"].to(dt),
                   global_hidden_states=cond["global_hidden_states"].to(dt), rotary_embedding=rot,
                   return_dict=False)[0]

    @torch.no_grad()
    def sample_latents(self, prompts: list[str], num_inference_steps: int = 25, guidance_scale: float = 1.0,
                       generator=None, use_reference: bool = False) -> torch.Tensor:
        """Deterministic DDIM on the cosine schedule, t: 1 → 0 in ``num_inference_steps`` uniform steps.

        Each step: v̂ = net(x, t); x̂0 = a·x − s·v̂; ε̂ = s·x + a·v̂; x ← a'·x̂0 + s'·ε̂. Initial noise of sample i
        from ``generator[i]`` (CPU). Returns latents ``(N, C, L)`` float32 on the adapter's device.
        """
        n = len(prompts)
        gens = generator if isinstance(generator, list) else [generator] * n
        shape = (self.pipe.transformer.config.in_channels, self.latent_frames)
        x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(self.device)
        cond = self.encode_prompt(prompts)
        ctx = self.reference() if use_reference else contextlib.nullcontext(self.denoiser())
        with ctx as net:
            was = net.training
            net.eval()
            try:
                ts = torch.linspace(1.0, 0.0, num_inference_steps + 1)
                for i in range(num_inference_steps):
                    t = torch.full((n,), float(ts[i]), device=self.device)
                    v = self.predict(x, t, cond, unet=net).float()
                    if guidance_scale > 1.0:
                        v_u = self.predict(x, t, self.unconditional(cond), unet=net).float()
                        v = v_u + guidance_scale * (v - v_u)
                    a, s = math.cos(0.5 * math.pi * ts[i]), math.sin(0.5 * math.pi * ts[i])
                    x0, eps = a * x - s * v, s * x + a * v
                    a2, s2 = math.cos(0.5 * math.pi * ts[i + 1]), math.sin(0.5 * math.pi * ts[i + 1])
                    x = a2 * x0 + s2 * eps
            finally:
                net.train(was)
        return x.float()


def load_audio_pipeline(model: str, revision: str | None = None, family: str = "stable_audio"):
    """``tiny:stable_audio`` / ``tiny:audioldm2`` builders, else ``DiffusionPipeline.from_pretrained``.

    Raises:
        ValueError: an unknown tiny name. WeightsNotFoundError: unavailable offline.
    """
    if model.startswith("tiny:"):
        builders = {"tiny:stable_audio": tiny_stable_audio_pipeline, "tiny:audioldm2": tiny_audioldm2_pipeline}
        if model not in builders:
            raise ValueError(f"pipeline.model: unknown tiny audio model {model!r}; known: {', '.join(builders)}")
        return builders[model]()
    return load_diffusers_pipeline(model, revision)


AUDIO_PIPELINE_CLASSES = {"StableAudioPipeline": "stable_audio", "AudioLDM2Pipeline": "audioldm2"}


def audio_adapter_for(model: str, pipe=None, device="cpu"):
    """An inference-only audio adapter (no LoRA, no reference) for a pipeline folder / hub id / tiny name, or None
    when ``model`` is not a text-to-audio pipeline (``model_index.json`` ``_class_name``)."""
    if model.startswith("tiny:"):
        name = {"tiny:stable_audio": "stable_audio", "tiny:audioldm2": "audioldm2"}.get(model)
    else:
        idx = Path(resolve_model_path(model)) / "model_index.json"  # builtin:music → the shipped folder
        cls_name = json.loads(idx.read_text()).get("_class_name") if idx.exists() else type(pipe).__name__
        name = AUDIO_PIPELINE_CLASSES.get(cls_name)
    if name is None:
        return None
    pipe = pipe if pipe is not None else load_audio_pipeline(model, None, name)
    cls = StableAudioAdapter if name == "stable_audio" else AudioLDM2Adapter
    return cls(pipe, lora=None, reference="none", device=device)
