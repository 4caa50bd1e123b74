"""``builtin:music``: a tiny Stable Audio Open–architecture text-to-music model pretrained on real scores.

Components are the real Diffusers/Transformers classes of ``StableAudioPipeline``: ``AutoencoderOobleck`` (4 kHz
mono, downsampling (2, 4, 4, 4) = hop 128, 8 latent channels: a 4.096 s clip ↔ 8 × 128 latents),
``StableAudioDiTModel`` (4 layers, 4 heads × 16), a 2-layer ``T5EncoderModel`` on a word-level tokenizer of the
caption vocabulary, ``StableAudioProjectionModel`` (seconds_start / seconds_total), saved as an ordinary Diffusers
folder in ``genalign/assets/music/base`` that vanilla ``StableAudioPipeline.from_pretrained`` loads.
genalign samples it with the Stable Audio adapter's deterministic cosine DDIM (``pipeline.name: stable_audio``);
the saved scheduler is a placeholder (the real checkpoint's ``CosineDPMSolverMultistepScheduler`` needs
``torchsde``).

Data: the music21 corpus rendered by :mod:`genalign.data.music` (train split only; held-out pieces and the
held-out caption template are never trained on). :func:`build_music_base` rebuilds it deterministically
(``python scripts/build_music.py``).

Training recipe (genalign's own):

1. VAE: :func:`quiet_posterior` initialisation (posterior std starts at ~0.0025, not 0.69: the first build without
   it kept std/spread ≈ 0.71 after 150 steps, i.e. latents that were mostly noise), then :func:`fit_audio_vae` on
   random 1.024 s crops, L1 + multi-resolution STFT loss + 1e-6 · KL. The STFT term
   (spectral convergence + log-magnitude L1 at n_fft 256/512/1024; Yamamoto et al. 2020, Parallel WaveGAN §2.3;
   also the Oobleck/Stable Audio autoencoder loss) makes the decoder match the spectrum rather than exact phase,
   which plain L1 on waveforms fits poorly. The tiny KL weight keeps the posterior std ≪ the latent spread (the
   first digits VAE, with 1e-4, was mostly noise; the ratio is measured and recorded in ``build_report.json``).
2. :func:`normalize_vae_latents`: rescale the encoder's mean channels and the decoder's input weights so that the
   latents of the training clips have unit standard deviation (the DiT is trained on raw latents, latent_scale 1
   as Stable Audio Open), an exact reparametrisation of the same autoencoder.
3. DiT + T5 + projection jointly: cosine v-objective (the adapter's ``add_noise`` / ``target``), t ~ U(0, 1),
   10 % empty captions for classifier-free guidance, AdamW 1e-3 with warm-up and linear decay, batch 32.

Source: diffusers ``StableAudioPipeline`` / ``AutoencoderOobleck`` / ``StableAudioDiTModel`` (classes reused);
Evans et al. 2024, "Stable Audio Open" (architecture); genalign's recipe.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

MUSIC_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "music"
MUSIC_DIR = MUSIC_ASSETS / "base"
HELDOUT_PROMPTS = MUSIC_ASSETS / "prompts_heldout.txt"
TRAIN_PROMPTS = MUSIC_ASSETS / "prompts_train.txt"
HELDOUT_STATS = MUSIC_ASSETS / "heldout_stats_classifier.safetensors"
# Default sampler of the demo: cosine DDIM, 25 steps, no guidance (room above for alignment, as the digits base).
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 1.0
HOP = (2, 4, 4, 4)
LATENT_CHANNELS = 8


def music_base_path() -> Path:
    """Path of the shipped ``builtin:music`` pipeline folder.

    Raises:
        FileNotFoundError: the folder is missing (rebuild with ``python scripts/build_music.py``).
    """
    if not (MUSIC_DIR / "model_index.json").exists():
        raise FileNotFoundError(f"built-in music model not found at {MUSIC_DIR}; rebuild it with "
                                "`python scripts/build_music.py` (needs `pip install genalign[music]`)")
    return MUSIC_DIR


def music_asset(name: str) -> Path:
    """A shipped file of the music demo (``prompts_heldout.txt``, ``heldout_stats_classifier.safetensors``, ...).

    Raises:
        FileNotFoundError: missing (rebuild with ``python scripts/build_music.py``).
    """
    p = MUSIC_ASSETS / name
    if not p.exists():
        raise FileNotFoundError(f"music demo asset {str(p)!r} not found; rebuild with `python scripts/build_music.py`")
    return p


def music_stable_audio_pipeline(words: list[str], sample_rate: int = 4_000, latent_frames: int = 128,
                                seed: int = 0):
    """A ``StableAudioPipeline`` with the ``builtin:music`` architecture and random weights (see module docstring).

    Args:
        words: tokenizer vocabulary (whole words; others map to ``<unk>``). latent_frames: DiT window (128 ↔
            4.096 s at hop 128, 4 kHz). seed: initialisation seed.
    """
    from diffusers import AutoencoderOobleck, EDMDPMSolverMultistepScheduler, StableAudioDiTModel, StableAudioPipeline
    from diffusers.pipelines.stable_audio import StableAudioProjectionModel
    from transformers import T5Config, T5EncoderModel

    from genalign.pipelines.audio_base import tiny_word_tokenizer

    tok = tiny_word_tokenizer(tuple(words), model_max_length=24)
    torch.manual_seed(seed)
    te = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                 dropout_rate=0.0, pad_token_id=0, eos_token_id=1))
    vae = AutoencoderOobleck(encoder_hidden_size=2 * LATENT_CHANNELS, downsampling_ratios=list(HOP),
                             channel_multiples=[1, 1, 2, 4], decoder_channels=16, decoder_input_channels=LATENT_CHANNELS,
                             audio_channels=1, sampling_rate=sample_rate)
    quiet_posterior(vae)
    proj = StableAudioProjectionModel(text_encoder_dim=64, conditioning_dim=64, min_value=0, max_value=512)
    dit = StableAudioDiTModel(sample_size=latent_frames, in_channels=LATENT_CHANNELS, num_layers=4,
                              attention_head_dim=16, num_attention_heads=4, num_key_value_attention_heads=2,
                              out_channels=LATENT_CHANNELS, cross_attention_dim=64, time_proj_dim=32,
                              global_states_input_dim=128, cross_attention_input_dim=64)
    sched = EDMDPMSolverMultistepScheduler(sigma_min=0.3, sigma_max=500, sigma_data=1.0, prediction_type="v_prediction")
    return StableAudioPipeline(vae=vae, text_encoder=te, projection_model=proj, tokenizer=tok, transformer=dit,
                               scheduler=sched)


@torch.no_grad()
def quiet_posterior(vae, scale_bias: float = -6.0, gain: float = 0.1) -> None:
    """Initialise the Oobleck encoder so its posterior std starts near ``softplus(scale_bias)`` (≈ 0.0025) instead
    of ``softplus(0)`` ≈ 0.69: the bias of the output conv's scale half is set to ``scale_bias`` and its weight-norm
    gain multiplied by ``gain``. Why: with the small KL weight nothing pulls the std down during a short CPU
    pretraining, and a std of 0.69 against a latent spread of ~1 made the first build's latents mostly noise (the
    digits base's first VAE had the same defect).
    """
    conv = vae.encoder.conv2
    c = conv.bias.shape[0] // 2
    g = conv.parametrizations.weight.original0 if hasattr(conv, "parametrizations") else conv.weight_g
    conv.bias[c:] = scale_bias
    g[c:] *= gain


def multi_resolution_stft_loss(pred: torch.Tensor, target: torch.Tensor,
                               ffts: tuple[int, ...] = (256, 512, 1024)) -> torch.Tensor:
    """Mean over resolutions of spectral convergence ``‖|S|−|Ŝ|‖_F / ‖|S|‖_F`` + ``mean |log|S| − log|Ŝ||``.

    Shapes: ``(B, C, T)`` or ``(B, T)`` → scalar. Hop n_fft/4, Hann window.
    Source: Yamamoto et al. 2020 (Parallel WaveGAN, arXiv 1910.11480) §2.3.
    """
    p, t = pred.reshape(-1, pred.shape[-1]), target.reshape(-1, target.shape[-1])
    loss = pred.new_zeros(())
    for n in ffts:
        w = torch.hann_window(n, device=pred.device)
        sp = torch.stft(p, n, n // 4, window=w, return_complex=True).abs()
        st = torch.stft(t, n, n // 4, window=w, return_complex=True).abs()
        loss = loss + (sp - st).norm() / st.norm().clamp_min(1e-8) + F.l1_loss(torch.log(sp + 1e-5), torch.log(st + 1e-5))
    return loss / len(ffts)


def fit_audio_vae(vae, x: torch.Tensor, steps: int, batch_size: int, crop: int, kl_weight: float,
                  generator: torch.Generator, lr: float = 1e-3, desc: str | None = None) -> float:
    """Train an ``AutoencoderOobleck`` in place on random crops: L1 + :func:`multi_resolution_stft_loss` +
    ``kl_weight`` · KL of a posterior sample's reconstruction, AdamW. Deterministic for a generator.

    Args:
        x: ``(N, 1, T)`` waveforms in [−1, 1]. crop: samples per crop (a multiple of the hop). steps, batch_size:
        optimizer steps and crops per step.

    Returns:
        the last step's loss.
    """
    from tqdm import tqdm

    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - 0.9 * s / max(steps, 1))
    hop = int(vae.hop_length)
    for _ in tqdm(range(steps), desc=desc, disable=desc is None):
        idx = torch.randint(0, len(x), (batch_size,), generator=generator)
        off = torch.randint(0, (x.shape[-1] - crop) // hop + 1, (batch_size,), generator=generator) * hop
        xb = torch.stack([x[i, :, o:o + crop] for i, o in zip(idx.tolist(), off.tolist())])
        post = vae.encode(xb).latent_dist
        rec = vae.decode(post.sample(generator=generator)).sample
        loss = F.l1_loss(rec, xb) + multi_resolution_stft_loss(rec, xb) + kl_weight * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
    return loss.item()


@torch.no_grad()
def encode_posterior(vae, x: torch.Tensor, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and stds ``(N, C, L)`` of waveforms ``(N, 1, T)``."""
    mus, stds = [], []
    for i in range(0, len(x), batch):
        d = vae.encode(x[i:i + batch]).latent_dist
        mus.append(d.mean)
        stds.append(d.std)
    return torch.cat(mus), torch.cat(stds)


@torch.no_grad()
def normalize_vae_latents(vae, x: torch.Tensor) -> float:
    """Rescale the VAE so the posterior means of ``x`` have unit std: the encoder's output conv (mean half) is
    divided by s and the decoder's input conv multiplied by s (weight-norm gains), s = std of the means. The
    decoded waveform of a mean latent is unchanged. The posterior *std* is not rescaled (``softplus`` is not
    linear), so the noise-to-spread ratio is multiplied by s; :func:`build_music_base` reports it after this step.

    Returns:
        s.
    """
    mu, _ = encode_posterior(vae, x)
    s = float(mu.std())
    c = mu.shape[1]
    enc, dec = vae.encoder.conv2, vae.decoder.conv1
    for conv, sl, factor in ((enc, slice(0, c), 1.0 / s), (dec, slice(None), s)):
        g = conv.parametrizations.weight.original0 if hasattr(conv, "parametrizations") else conv.weight_g
        if conv is enc:
            g[sl] *= factor
            conv.bias[sl] *= factor
        else:
            g *= factor  # decoder input: every output channel's kernel scales with its input (z / s → z)
    return s


def _cond(pipe, prompts: list[str], seconds: float) -> dict[str, torch.Tensor]:
    """The Stable Audio adapter's conditioning, with gradients (for pretraining the text side)."""
    emb = pipe.encode_prompt(prompts, pipe.text_encoder.device, False)
    start, end = pipe.encode_duration(0.0, seconds, pipe.text_encoder.device, False, len(prompts))
    return {"encoder_hidden_states": torch.cat([emb, start, end], 1), "global_hidden_states": torch.cat([start, end], 2)}


def build_music_base(waveforms: torch.Tensor, captions: list[str], words: list[str], out_dir: str | Path = MUSIC_DIR,
                     vae_steps: int = 600, dit_steps: int = 1500, batch_size: int = 32, vae_batch: int = 8,
                     vae_crop: int = 4096, seed: int = 0, vae_kl_weight: float = 1e-6, progress: bool = True) -> dict:
    """Pretrain the ``builtin:music`` pipeline on rendered clips and save it (Diffusers format) to ``out_dir``.

    Args:
        waveforms: ``(N, 1, 16384)`` train clips (4 kHz). captions: N captions. words: tokenizer vocabulary.

    Returns:
        a report dict (timings, losses, VAE posterior-noise check, reconstruction SNR), also written to
        ``out_dir/build_report.json``.
    """
    from tqdm import tqdm

    from genalign.pipelines.audio import StableAudioAdapter

    t0 = time.time()
    g = torch.Generator().manual_seed(seed)
    pipe = music_stable_audio_pipeline(words, seed=seed)
    vae = pipe.vae
    vae_loss = fit_audio_vae(vae, waveforms, vae_steps, vae_batch, vae_crop, vae_kl_weight, g,
                             desc="music VAE" if progress else None)
    vae.eval().requires_grad_(False)
    # scale and reconstruction quality from an evenly spaced subset (encoding is the costly part on CPU)
    sub = waveforms[torch.linspace(0, len(waveforms) - 1, min(len(waveforms), 64)).long()]
    scale = normalize_vae_latents(vae, sub)
    mu, std = encode_posterior(vae, waveforms)
    with torch.no_grad():
        mu_sub, _ = encode_posterior(vae, sub)
        rec = torch.cat([vae.decode(mu_sub[i:i + 32]).sample for i in range(0, len(mu_sub), 32)])
        snr = float(10 * torch.log10(sub.pow(2).sum() / (rec - sub).pow(2).sum()))
        stft_err = float(multi_resolution_stft_loss(rec, sub))
    vae_seconds = time.time() - t0

    ad = StableAudioAdapter(pipe, lora=None, reference="none")
    dit, te, proj = pipe.transformer, pipe.text_encoder, pipe.projection_model
    for m in (dit, te, proj):
        m.requires_grad_(True).train()
    params = list(dit.parameters()) + list(te.parameters()) + list(proj.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * (0.1 + 0.9 * (1 - s / dit_steps)))
    for _ in tqdm(range(dit_steps), desc="music DiT", disable=not progress):
        idx = torch.randint(0, len(mu), (batch_size,), generator=g)
        lat = mu[idx] + std[idx] * torch.randn(mu[idx].shape, generator=g)
        drop = (torch.rand(batch_size, generator=g) < 0.1).tolist()
        prompts = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop)]
        cond = _cond(pipe, prompts, ad.audio_seconds)
        noise = torch.randn(lat.shape, generator=g)
        t = torch.rand(batch_size, generator=g)
        pred = ad.predict(ad.add_noise(lat, noise, t), t, cond, unet=dit)
        loss = F.mse_loss(pred.float(), ad.target(lat, noise, t))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    for m in (dit, te, proj, vae):
        m.eval().requires_grad_(False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir)
    report = {
        "seed": seed, "clips": len(waveforms), "vae_steps": vae_steps, "dit_steps": dit_steps, "batch_size": batch_size,
        "vae_loss": round(vae_loss, 4), "dit_mse": round(loss.item(), 4), "latent_rescale": round(scale, 4),
        # posterior noise check (digits lesson): mean posterior std vs the std of the posterior means
        "vae_posterior_std": round(float(std.mean()), 5), "vae_latent_spread": round(float(mu.std()), 5),
        "vae_noise_to_spread": round(float(std.mean() / mu.std()), 5),
        "vae_reconstruction_snr_db": round(snr, 2), "vae_reconstruction_mrstft": round(stft_err, 4),
        "vae_seconds": round(vae_seconds, 1), "seconds": round(time.time() - t0, 1),
    }
    (out_dir / "build_report.json").write_text(json.dumps(report, indent=2))
    return report


__all__ = [
    "DEFAULT_GUIDANCE", "DEFAULT_STEPS", "HELDOUT_PROMPTS", "HELDOUT_STATS", "MUSIC_DIR", "build_music_base",
    "encode_posterior", "fit_audio_vae", "multi_resolution_stft_loss", "music_asset", "music_base_path",
    "music_stable_audio_pipeline", "normalize_vae_latents", "quiet_posterior",
]
