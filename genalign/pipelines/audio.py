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
``guidance_scale > 1`` uses zero unconditional embeddings as the pipeline does.

**AudioLDM2** (``AudioLDM2Pipeline``: mel-latent ``AudioLDM2UNet2DConditionModel``, CLAP + T5 (+ GPT-2
"language model") conditioning, ``SpeechT5HifiGan`` vocoder): ε-prediction, ``DDIMScheduler`` scaled_linear
0.0015→0.0195, 1000 steps, ``add_noise`` (dragon.md §5). Latents ``(B, 8, T_mel/4, 16)``.

Tiny builders (random weights, real classes, CPU in seconds): :func:`tiny_stable_audio_pipeline`,
:func:`tiny_audioldm2_pipeline`; names ``tiny:stable_audio``, ``tiny:audioldm2`` in ``pipeline.model``.

Source: diffusers 0.42 ``pipelines/stable_audio/pipeline_stable_audio.py`` and
``pipelines/audioldm2/pipeline_audioldm2.py`` (conditioning code reused, not re-implemented).
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Iterator

import torch

from genalign.registry import pipelines as PIPELINES

SYNTH_WORDS = ("a slow medium fast tone chord rhythm in C D E F G A B piano guitar drums music song with beat "
               "bass high low loud soft").split()


def tiny_word_tokenizer(words=tuple(SYNTH_WORDS), model_max_length: int = 16):
    """A word-level ``PreTrainedTokenizerFast`` (``<pad>``=0, ``</s>``=1, ``<unk>``=2, then ``words``; case kept).

    Stands in for T5's SentencePiece tokenizer in tiny builds; saves / reloads offline.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   model_max_length=model_max_length)


def _t5_encoder(vocab_size: int, d_model: int = 32, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                                   num_heads=2, dropout_rate=0.0, pad_token_id=0, eos_token_id=1))


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
    te = _t5_encoder(len(tok), seed=seed)
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


def _to(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    from genalign.pipelines.base import _to as base_to

    return base_to(module, torch.device(device), dtype)


def set_adapters_enabled(net: torch.nn.Module, enabled: bool) -> None:
    """Enable / disable every LoRA layer (diffusers ``enable_adapters`` when present, else peft's tuner layers)."""
    if hasattr(net, "disable_adapters") and hasattr(net, "enable_adapters") and hasattr(net, "peft_config"):
        (net.enable_adapters if enabled else net.disable_adapters)()
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in net.modules():
        if isinstance(m, BaseTunerLayer):
            m.enable_adapters(enabled)


def _timestep_fraction(t: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """Integer timesteps k → t = (k + ½)/T; floating t is returned as float32 unchanged."""
    if t.is_floating_point():
        return t.float()
    return (t.float() + 0.5) / num_train_timesteps


class _AudioAdapterMixin:
    """Shared construction (LoRA / reference strategy) and verbs of the audio adapters."""

    family = "audio"
    pipe_denoiser = "unet"

    def _setup_trainable(self, net, lora, reference: str, device, weight_dtype, gradient_checkpointing: bool):
        self.device = torch.device(device)
        self.weight_dtype = weight_dtype
        self.lora = lora
        self.unet = net
        for m in self.frozen_modules():
            m.requires_grad_(False)
            m.eval()
            m.to(self.device)
        self.ref_unet = None
        if reference == "none":  # inference only (genalign generate): no reference network
            lora = None
        elif reference == "frozen_copy":
            self.ref_unet = _to(copy.deepcopy(net).requires_grad_(False).eval(), self.device, weight_dtype)
        elif lora is None:
            raise ValueError("pipeline.reference: 'adapter_off' needs LoRA (pipeline.lora); use 'frozen_copy' for "
                             "full fine-tuning")
        if lora is not None:
            from peft import LoraConfig as PeftLoraConfig

            net.requires_grad_(False)
            _to(net, self.device, weight_dtype)
            pcfg = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank,
                                  init_lora_weights=lora.init if lora.init == "gaussian" else True,
                                  target_modules=list(lora.target_modules), lora_dropout=lora.dropout)
            if hasattr(net, "add_adapter"):
                net.add_adapter(pcfg)
            else:  # StableAudioDiTModel has no PeftAdapterMixin: inject the LoRA layers directly
                from peft import inject_adapter_in_model

                inject_adapter_in_model(pcfg, net)
            for p in net.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        elif reference == "none":
            _to(net, self.device, weight_dtype).requires_grad_(False)
        else:
            _to(net, self.device, torch.float32).requires_grad_(True)
        if gradient_checkpointing and hasattr(net, "enable_gradient_checkpointing"):
            net.enable_gradient_checkpointing()
        net.train()
        if hasattr(self.pipe, "set_progress_bar_config"):
            self.pipe.set_progress_bar_config(disable=True)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """LoRA weights, or the whole denoiser for full fine-tunes."""
        return [p for p in self.denoiser().parameters() if p.requires_grad]

    def denoiser(self) -> torch.nn.Module:
        """The trained DiT / UNet, unwrapped (never the DDP wrapper)."""
        raw = getattr(self, "_raw_unet", None)  # set by use_prepared
        return raw if raw is not None else self.unet

    def use_prepared(self, module: torch.nn.Module) -> None:
        """Install the Accelerate-wrapped denoiser for training forwards."""
        if getattr(self, "_raw_unet", None) is None:
            self._raw_unet = self.unet
        self.unet = module

    def model_card_extra(self, cfg) -> str:
        """No extra model-card section for audio exports."""
        return ""

    @contextlib.contextmanager
    def reference(self) -> Iterator[Any]:
        """The reference denoiser under ``no_grad``: LoRA disabled (default) or the frozen copy."""
        with torch.no_grad():
            if self.ref_unet is not None:
                yield self.ref_unet
                return
            net = getattr(self, "_raw_unet", self.unet)
            set_adapters_enabled(net, False)
            try:
                yield net
            finally:
                set_adapters_enabled(net, True)

    def pair_extra_cond(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {}

    def save_unet(self, out_dir) -> None:
        self.unet.save_pretrained(out_dir)

    def write_export(self, out_dir, cfg=None) -> None:
        """Export hook (``genalign.export``): the whole pipeline with the LoRA folded into the denoiser (loads with
        ``DiffusionPipeline.from_pretrained``) plus the LoRA alone as ``genalign_lora.safetensors`` (peft names).
        Audio pipelines have no Diffusers LoRA loader, so the image path (``save_lora_weights``) does not apply."""
        from pathlib import Path

        from genalign.objectives.ddo import _write_merged_export

        _write_merged_export(self, out_dir, cfg)
        if self.lora is not None:
            from peft.utils import get_peft_model_state_dict
            from safetensors.torch import save_file

            raw = getattr(self, "_raw_unet", self.unet)
            state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(raw).items()}
            save_file(state, str(Path(out_dir) / "genalign_lora.safetensors"))

    @torch.no_grad()
    def sample(self, prompts: list[str], num_inference_steps: int = 25, guidance_scale: float = 1.0,
               generator=None, batch_size: int = 16, **kwargs) -> torch.Tensor:
        """Waveforms ``(N, C, T)`` in [−1, 1] (float32 CPU), seeded (a list of N generators, or one)."""
        gens = generator if isinstance(generator, list) else [generator] * len(prompts)
        out = []
        for i in range(0, len(prompts), batch_size):
            lat = self.sample_latents(prompts[i:i + batch_size], num_inference_steps, guidance_scale,
                                      gens[i:i + batch_size])
            out.append(self.decode(lat.to(self.device)).float().cpu())
        return torch.cat(out)


@PIPELINES.register("stable_audio", "Stable Audio Open: DiT + Oobleck VAE, cosine v-objective (text-to-music)")
class StableAudioAdapter(_AudioAdapterMixin):
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

    def _ats(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tt = _timestep_fraction(t, self.num_train_timesteps).to(like.device)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return tt, torch.cos(0.5 * math.pi * tt).view(shape), torch.sin(0.5 * math.pi * tt).view(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = cos(πt/2)·x0 + sin(πt/2)·ε (fp32)."""
        _, a, s = self._ats(t, x0)
        return a * x0.float() + s * noise.float()

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = cos(πt/2)·ε − sin(πt/2)·x0 (fp32)."""
        _, a, s = self._ats(t, x0)
        return a * noise.float() - s * x0.float()

    def x0_from_prediction(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 = cos(πt/2)·x_t − sin(πt/2)·v̂."""
        _, a, s = self._ats(t, x_t)
        return a * x_t.float() - s * v.float()

    def _rotary(self, length: int):
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        return get_1d_rotary_pos_embed(self.pipe.rotary_embed_dim, length + 1, use_real=True,
                                       repeat_interleave_real=False)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any], unet=None) -> torch.Tensor:
        """DiT v-prediction ``(N, C, L)`` at integer (mapped to (k+½)/T) or float timesteps t ``(N,)``."""
        net = unet or self.unet
        tt = _timestep_fraction(t, self.num_train_timesteps).to(x_t.device)
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
        shape = (self.pipe.transformer.config.in_channels if hasattr(self.pipe, "transformer") else self.pipe.unet.config.in_channels,
                 self.latent_frames)
        x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(self.device)
        cond = self.encode_prompt(prompts)
        ctx = self.reference() if use_reference else contextlib.nullcontext(getattr(self, "_raw_unet", self.unet))
        with ctx as net:
            was = net.training
            net.eval()
            try:
                ts = torch.linspace(1.0, 0.0, num_inference_steps + 1)
                for i in range(num_inference_steps):
                    t = torch.full((n,), float(ts[i]), device=self.device)
                    v = self.predict(x, t, cond, unet=net).float()
                    if guidance_scale > 1.0:
                        null = {k: torch.zeros_like(c) for k, c in cond.items()}
                        v_u = self.predict(x, t, null, unet=net).float()
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
    from genalign.pipelines.base import load_diffusers_pipeline

    return load_diffusers_pipeline(model, revision)


AUDIO_PIPELINE_CLASSES = {"StableAudioPipeline": "stable_audio", "AudioLDM2Pipeline": "audioldm2"}


def audio_adapter_for(model: str, pipe=None, device="cpu"):
    """An inference-only audio adapter (no LoRA, no reference) for a pipeline folder / hub id / tiny name, or None
    when ``model`` is not a text-to-audio pipeline (``model_index.json`` ``_class_name``)."""
    import json
    from pathlib import Path

    if model.startswith("tiny:"):
        name = {"tiny:stable_audio": "stable_audio", "tiny:audioldm2": "audioldm2"}.get(model)
    else:
        idx = Path(model) / "model_index.json"
        cls_name = json.loads(idx.read_text()).get("_class_name") if idx.exists() else type(pipe).__name__
        name = AUDIO_PIPELINE_CLASSES.get(cls_name)
    if name is None:
        return None
    pipe = pipe if pipe is not None else load_audio_pipeline(model, None, name)
    cls = StableAudioAdapter if name == "stable_audio" else AudioLDM2Adapter
    return cls(pipe, lora=None, reference="none", device=device)


def generate_audio_files(adapter, prompts: list[str], out_dir, num_inference_steps: int = 25,
                         guidance_scale: float = 1.0, seed: int = 0, batch_size: int = 16) -> list[dict]:
    """Generate one WAV per prompt (sample i seeded with ``seed + i``) into ``out_dir``; return metadata rows
    ``{"file_name", "prompt", "seed", "sample_rate"}`` (what ``genalign generate`` writes to metadata.jsonl)."""
    from pathlib import Path

    from genalign.data.audio import save_audio

    out_dir = Path(out_dir)
    rows = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        wavs = adapter.sample(chunk, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              generator=gens, batch_size=batch_size)
        for j, w in enumerate(wavs):
            name = f"{i + j:05d}.wav"
            save_audio(out_dir / name, w, adapter.sample_rate)
            rows.append({"file_name": name, "prompt": chunk[j], "seed": seed + i + j, "sample_rate": adapter.sample_rate})
    return rows


# -- AudioLDM2 -------------------------------------------------------------------------------------------------


def _tiny_t5_tokenizer(words=tuple(SYNTH_WORDS), model_max_length: int = 16):
    """A real ``T5Tokenizer`` (Unigram) with whole words plus single characters, offline."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in dict.fromkeys(words)]
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.'!?-"
    pieces += [("▁", -4.0)] + [(c, -5.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def _tiny_roberta_tokenizer(model_max_length: int = 16):
    """A real byte-level ``RobertaTokenizer`` (256 byte symbols, no merges), offline."""
    from transformers import RobertaTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
    vocab.setdefault("<mask>", len(vocab))
    return RobertaTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def tiny_audioldm2_pipeline(seed: int = 0, sample_rate: int = 8_000, mel_bins: int = 16):
    """An ``AudioLDM2Pipeline`` of tiny random components of the real classes.

    CLAP text tower (rewards.md §6 tiny config, projection 32) + byte-level RoBERTa tokenizer; 1-layer T5 + Unigram
    tokenizer; ``AudioLDM2ProjectionModel`` (32 → 32); a 1-layer GPT-2 "language model" generating 4 embeddings;
    ``AudioLDM2UNet2DConditionModel`` (8, 16 channels, cross-attention to GPT-2 and T5 states); a one-block-down
    ``AutoencoderKL`` on (frames, ``mel_bins``) mel images (scale factor 2, 4 latent channels);
    ``SpeechT5HifiGan`` (hop 16 at ``sample_rate``); ``DDIMScheduler`` with AudioLDM2's betas (scaled_linear
    0.0015 → 0.0195, ε-prediction).
    """
    from diffusers import AudioLDM2Pipeline, AudioLDM2ProjectionModel, AudioLDM2UNet2DConditionModel, AutoencoderKL, \
        DDIMScheduler
    from transformers import ClapFeatureExtractor, ClapModel, GPT2Config, GPT2LMHeadModel, SpeechT5HifiGan, \
        SpeechT5HifiGanConfig

    from genalign.rewards.clap import tiny_clap_config

    torch.manual_seed(seed)
    clap = ClapModel(tiny_clap_config())
    tok = _tiny_roberta_tokenizer()
    tok2 = _tiny_t5_tokenizer()
    t5 = _t5_encoder(len(tok2), seed=seed)
    proj = AudioLDM2ProjectionModel(text_encoder_dim=32, text_encoder_1_dim=32, langauge_model_dim=32)
    gpt = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64, bos_token_id=0,
                                     eos_token_id=0))
    gpt.config.max_new_tokens = 4
    unet = AudioLDM2UNet2DConditionModel(
        sample_size=(32, mel_bins // 2), in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=(32, 32), attention_head_dim=4)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        norm_num_groups=8)
    voc = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=mel_bins, sampling_rate=sample_rate, upsample_initial_channel=16, upsample_rates=[4, 4],
        upsample_kernel_sizes=[8, 8], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
        normalize_before=False))
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    return AudioLDM2Pipeline(vae=vae, text_encoder=clap, text_encoder_2=t5, projection_model=proj, language_model=gpt,
                             tokenizer=tok, tokenizer_2=tok2, feature_extractor=ClapFeatureExtractor(), unet=unet,
                             scheduler=sched, vocoder=voc)


def audioldm_log_mel(waveform: torch.Tensor, sample_rate: int, n_mels: int, hop_length: int,
                     n_fft: int | None = None, f_max: float | None = None) -> torch.Tensor:
    """AudioLDM's mel front end: ``(B, T)`` or ``(B, 1, T)`` → ``(B, 1, frames, n_mels)`` = log(clamp(|STFT|·mel, 1e-5)).

    Magnitude (power 1) STFT with a Hann window of ``n_fft`` (default 4·hop, AudioLDM: 1024 at hop 160, 16 kHz),
    slaney mel filters over [0, f_max] (default sample_rate/2), natural-log dynamic-range compression, frames =
    T // hop. [recon] of AudioLDM's ``TacotronSTFT`` settings, not bit-identical.
    """
    from transformers.audio_utils import mel_filter_bank

    x = waveform.float()
    if x.ndim == 3:
        x = x.mean(1)
    n_fft = n_fft or 4 * hop_length
    spec = torch.stft(x, n_fft, hop_length, window=torch.hann_window(n_fft, device=x.device), center=True,
                      return_complex=True).abs()  # (B, F, frames + 1)
    fb = torch.from_numpy(mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0,
                                          max_frequency=f_max or sample_rate / 2, sampling_rate=sample_rate,
                                          norm="slaney", mel_scale="slaney")).float().to(x.device)
    mel = torch.log(torch.clamp(spec.transpose(1, 2) @ fb, min=1e-5))
    return mel[:, None, : x.shape[-1] // hop_length]


@PIPELINES.register("audioldm2", "AudioLDM2: mel-latent UNet, CLAP + T5 + GPT-2 conditioning, epsilon / DDIM")
class AudioLDM2Adapter(_AudioAdapterMixin):
    """Adapter over ``AudioLDM2Pipeline`` (ε-prediction, DDIM; see module docstring).

    Args:
        pipe: a loaded ``AudioLDM2Pipeline``. lora / reference / device / weight_dtype: as the image adapters.
        audio_seconds: clip length; the latent height is ``seconds·sr / hop / vae_scale`` rounded to the VAE
            scale (default: 32 latent frames for tiny builds, 10.24 s for real checkpoints).

    Shapes: latents ``(B, C, H, W)`` with W = mel_bins / vae_scale; conditioning ``{"encoder_hidden_states"
    (GPT-2 generated, (B, 8, D)), "encoder_hidden_states_1" (T5, (B, S, D1)), "encoder_attention_mask_1" (B, S)}``;
    waveforms ``(B, 1, T)``.
    """

    pipe_denoiser = "unet"

    def __init__(self, pipe, lora=None, reference: str = "adapter_off", device="cpu",
                 weight_dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False,
                 attention: str = "sdpa", resolution: int | None = None, audio_seconds: float | None = None):
        from diffusers import DDPMScheduler

        self.pipe = pipe
        self.vae = pipe.vae
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.num_train_timesteps = int(self.noise_scheduler.config.num_train_timesteps)
        voc = pipe.vocoder.config
        self.sample_rate = int(voc.sampling_rate)
        self.hop_length = int(math.prod(voc.upsample_rates))
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.mel_bins = int(voc.model_in_dim)
        if audio_seconds is None:
            frames = 32 * self.vae_scale if self.sample_rate < 16_000 else 1024
        else:
            frames = int(round(audio_seconds * self.sample_rate / self.hop_length))
        frames = max(self.vae_scale, frames // self.vae_scale * self.vae_scale)
        self.audio_seconds = frames * self.hop_length / self.sample_rate
        self.latent_shape = (int(pipe.unet.config.in_channels), frames // self.vae_scale, self.mel_bins // self.vae_scale)
        self.resolution = None
        self._setup_trainable(pipe.unet, lora, reference, device, weight_dtype, gradient_checkpointing)

    @classmethod
    def from_config(cls, cfg, device="cpu", weight_dtype=torch.float32) -> "AudioLDM2Adapter":
        """Build from a :class:`genalign.config.PipelineConfig` (``tiny:audioldm2``, a folder or hub id)."""
        pipe = load_audio_pipeline(cfg.model, cfg.revision, "audioldm2")
        return cls(pipe, lora=cfg.lora, reference=cfg.reference, device=device, weight_dtype=weight_dtype,
                   gradient_checkpointing=cfg.gradient_checkpointing)

    def frozen_modules(self) -> list[torch.nn.Module]:
        p = self.pipe
        return [self.vae, p.text_encoder, p.text_encoder_2, p.projection_model, p.language_model, p.vocoder]

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> dict[str, Any]:
        """``B`` prompts → UNet conditioning (``AudioLDM2Pipeline.encode_prompt`` without CFG), fp32."""
        p = self.pipe
        embeds, mask, generated = p.encode_prompt(list(prompts), self.device, 1, False,
                                                  max_new_tokens=p.language_model.config.max_new_tokens)
        return {"encoder_hidden_states": generated.float(), "encoder_hidden_states_1": embeds.float(),
                "encoder_attention_mask_1": mask}

    @torch.no_grad()
    def encode(self, waveforms: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Waveforms ``(B, 1, T)`` → log-mel (:func:`audioldm_log_mel`) → VAE posterior sample × scaling_factor."""
        mel = audioldm_log_mel(waveforms.to(self.device), self.sample_rate, self.mel_bins, self.hop_length)
        frames = self.latent_shape[1] * self.vae_scale
        mel = mel[:, :, :frames] if mel.shape[2] >= frames else torch.nn.functional.pad(mel, (0, 0, 0, frames - mel.shape[2]), value=math.log(1e-5))
        dist = self.vae.encode(mel).latent_dist
        eps = torch.randn(dist.mean.shape, generator=generator).to(dist.mean.device)
        return (dist.mean + dist.std * eps) * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → mel (VAE) → waveform (HiFi-GAN vocoder) ``(B, 1, T)``, clipped to [−1, 1]."""
        mel = self.vae.decode(latents.float() / self.vae.config.scaling_factor).sample
        wav = self.pipe.vocoder(mel.squeeze(1))
        return wav.float()[:, None].clamp(-1, 1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε (``DDPMScheduler.add_noise``)."""
        return self.noise_scheduler.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε (AudioLDM2 is ε-prediction); v for a v-prediction checkpoint.

        Raises:
            ValueError: another prediction type.
        """
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(x0, noise, t)
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any], unet=None) -> torch.Tensor:
        """UNet output ``(N, C, H, W)`` at integer timesteps ``t`` ``(N,)``."""
        net = unet or self.unet
        dt = self.weight_dtype
        return net(x_t.to(dt), t, encoder_hidden_states=cond["encoder_hidden_states"].to(dt),
                   encoder_hidden_states_1=cond["encoder_hidden_states_1"].to(dt),
                   encoder_attention_mask_1=cond["encoder_attention_mask_1"], return_dict=False)[0]

    @torch.no_grad()
    def sample_latents(self, prompts: list[str], num_inference_steps: int = 25, guidance_scale: float = 1.0,
                       generator=None, use_reference: bool = False) -> torch.Tensor:
        """DDIM (η = 0) with the pipeline's scheduler settings; CFG with empty-prompt conditioning when > 1."""
        from diffusers import DDIMScheduler

        n = len(prompts)
        gens = generator if isinstance(generator, list) else [generator] * n
        sched = DDIMScheduler.from_config(self.pipe.scheduler.config)
        sched.set_timesteps(num_inference_steps)
        x = torch.stack([torch.randn(self.latent_shape, generator=g) for g in gens]).to(self.device)
        x = x * sched.init_noise_sigma
        cond = self.encode_prompt(prompts)
        null = self.encode_prompt([""] * n) if guidance_scale > 1.0 else None
        ctx = self.reference() if use_reference else contextlib.nullcontext(getattr(self, "_raw_unet", self.unet))
        with ctx as net:
            was = net.training
            net.eval()
            try:
                for t in sched.timesteps:
                    tt = torch.full((n,), int(t), device=self.device)
                    xin = sched.scale_model_input(x, t)
                    eps = self.predict(xin, tt, cond, unet=net).float()
                    if null is not None:
                        eu = self.predict(xin, tt, null, unet=net).float()
                        eps = eu + guidance_scale * (eps - eu)
                    x = sched.step(eps, t, x).prev_sample
            finally:
                net.train(was)
        return x.float()
