"""AudioLDM2 adapter (``audioldm2``) and its tiny builder.

``AudioLDM2Pipeline``: mel-latent ``AudioLDM2UNet2DConditionModel``, CLAP + T5 (+ GPT-2 "language model")
conditioning, ``SpeechT5HifiGan`` vocoder; ε-prediction, ``DDIMScheduler`` scaled_linear 0.0015→0.0195, 1000 steps,
``add_noise`` (dragon.md §5). Latents ``(B, 8, T_mel/4, 16)``. Tiny builder: :func:`tiny_audioldm2_pipeline`
(``tiny:audioldm2``).

Source: diffusers 0.42 ``pipelines/audioldm2/pipeline_audioldm2.py`` (conditioning code reused).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from genalign.pipelines.audio_base import SYNTH_WORDS, AudioAdapterMixin, tiny_t5_encoder
from genalign.pipelines.base import load_diffusers_pipeline
from genalign.registry import pipelines as PIPELINES
from genalign.rewards.clap import tiny_clap_config


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

    torch.manual_seed(seed)
    clap = ClapModel(tiny_clap_config())
    tok = _tiny_roberta_tokenizer()
    tok2 = _tiny_t5_tokenizer()
    t5 = tiny_t5_encoder(len(tok2), seed=seed)
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
class AudioLDM2Adapter(AudioAdapterMixin):
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
        """Build from a :class:`genalign.config.PipelineConfig` (``tiny:audioldm2``, a folder or hub id).

        Raises:
            ValueError: another ``tiny:`` name. WeightsNotFoundError: unavailable offline.
        """
        if cfg.model.startswith("tiny:") and cfg.model != "tiny:audioldm2":
            raise ValueError(f"pipeline.model: unknown tiny AudioLDM2 model {cfg.model!r}; known: tiny:audioldm2")
        pipe = tiny_audioldm2_pipeline() if cfg.model == "tiny:audioldm2" else load_diffusers_pipeline(cfg.model, cfg.revision)
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
        ctx = self.reference() if use_reference else contextlib.nullcontext(self.denoiser())
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
