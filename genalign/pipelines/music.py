"""``builtin:music``: a tiny Stable Audio Open–architecture text-to-music model pretrained on real scores.

Components are the real Diffusers/Transformers classes of ``StableAudioPipeline``: ``AutoencoderOobleck`` (4 kHz
mono, downsampling (4, 4, 4) = hop 64, 32 latent channels: a 4.096 s clip ↔ 32 × 256 latents, 2× compression),
``StableAudioDiTModel`` (4 layers, 4 heads × 16), a 2-layer ``T5EncoderModel`` on a word-level tokenizer of the
caption vocabulary, ``StableAudioProjectionModel`` (seconds_start / seconds_total), saved as an ordinary Diffusers
folder in ``genalign/assets/music/base`` that vanilla ``StableAudioPipeline.from_pretrained`` loads.
genalign samples it with the Stable Audio adapter's deterministic cosine DDIM (``pipeline.name: stable_audio``);
the saved scheduler is a placeholder (the real checkpoint's ``CosineDPMSolverMultistepScheduler`` needs
``torchsde``).

Data: the music21 corpus rendered by :mod:`genalign.data.music` (train split only; held-out pieces and the
held-out caption template are never trained on). :func:`build_music_base` rebuilds it deterministically
(``python scripts/build_music.py``).

Recipe (genalign's own):

1. VAE in closed form (:func:`fit_linear_oobleck`): the Oobleck network set to a linear lapped transform — PCA
   analysis of 64-sample frames (32 of 64 directions, unit-std latents) and a least-squares synthesis from 7
   neighbouring latent frames — with a constant posterior std of ≈ 0.0026. Why: trained by gradient descent from
   scratch (L1 + multi-resolution STFT + KL, the Oobleck loss) it collapsed to near-silence on 2 CPU cores (0 dB
   reconstruction SNR after 200 steps; the key classifier at chance on its decodes), whereas the fit takes seconds
   and its held-out reconstructions keep the classifier's accuracy (``build_report.json``).
2. DiT + T5 + projection jointly: cosine v-objective (the adapter's ``add_noise`` / ``target``), t ~ U(0, 1),
   10 % empty captions for classifier-free guidance, AdamW 1e-3 with warm-up and linear decay, batch 32.

Source: diffusers ``StableAudioPipeline`` / ``AutoencoderOobleck`` / ``StableAudioDiTModel`` (classes reused);
Evans et al. 2024, "Stable Audio Open" (architecture); genalign's recipe.
"""

from __future__ import annotations

import json
import logging
import math
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
HOP = (4, 4, 4)
LATENT_CHANNELS = 32
LATENT_FRAMES = 256  # 16384 samples / hop 64


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


def music_stable_audio_pipeline(words: list[str], sample_rate: int = 4_000, latent_frames: int = LATENT_FRAMES,
                                seed: int = 0):
    """A ``StableAudioPipeline`` with the ``builtin:music`` architecture and random weights (see module docstring).

    Args:
        words: tokenizer vocabulary (whole words; others map to ``<unk>``). latent_frames: DiT window (256 ↔
            4.096 s at hop 64, 4 kHz). seed: initialisation seed.
    """
    from diffusers import AutoencoderOobleck, EDMDPMSolverMultistepScheduler, StableAudioDiTModel, StableAudioPipeline
    from diffusers.pipelines.stable_audio import StableAudioProjectionModel
    from transformers import T5Config, T5EncoderModel

    from genalign.pipelines.audio_base import tiny_word_tokenizer

    tok = tiny_word_tokenizer(tuple(words), model_max_length=24)
    torch.manual_seed(seed)
    te = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                 dropout_rate=0.0, pad_token_id=0, eos_token_id=1))
    # widths: encoder 64·[1, 1, 2, 4], decoder 16·[4, 2, 1, 1]: each stage has at least as many channels as samples
    # per frame at its rate (needed by the lapped-transform initialisation, fit_linear_oobleck)
    vae = AutoencoderOobleck(encoder_hidden_size=2 * LATENT_CHANNELS, downsampling_ratios=list(HOP),
                             channel_multiples=[1, 2, 4], decoder_channels=16, decoder_input_channels=LATENT_CHANNELS,
                             audio_channels=1, sampling_rate=sample_rate)
    proj = StableAudioProjectionModel(text_encoder_dim=64, conditioning_dim=64, min_value=0, max_value=512)
    dit = StableAudioDiTModel(sample_size=latent_frames, in_channels=LATENT_CHANNELS, num_layers=4,
                              attention_head_dim=16, num_attention_heads=4, num_key_value_attention_heads=2,
                              out_channels=LATENT_CHANNELS, cross_attention_dim=64, time_proj_dim=32,
                              global_states_input_dim=128, cross_attention_input_dim=64)
    sched = EDMDPMSolverMultistepScheduler(sigma_min=0.3, sigma_max=500, sigma_data=1.0, prediction_type="v_prediction")
    return StableAudioPipeline(vae=vae, text_encoder=te, projection_model=proj, tokenizer=tok, transformer=dit,
                               scheduler=sched)


@torch.no_grad()
def _set_weight(conv, w: torch.Tensor) -> None:
    """Give a weight-normed conv (old ``weight_g``/``weight_v`` or parametrised) the effective weight ``w``."""
    if hasattr(conv, "parametrizations"):
        g, v = conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
    else:
        g, v = conv.weight_g, conv.weight_v
    norms = w.flatten(1).norm(dim=1)
    v.copy_(torch.where((norms > 0).view(-1, *[1] * (w.dim() - 1)), w, torch.ones_like(w)))
    g.copy_(norms.view_as(g))


def _frames(x: torch.Tensor, hop: int) -> torch.Tensor:
    """``(N, 1, T)`` → ``(N, T / hop, hop)`` float64 frames."""
    return x[:, 0].reshape(x.shape[0], -1, hop).double()


def _context(f: torch.Tensor, radius: int) -> torch.Tensor:
    """``(N, F, D)`` → ``(N, F, (2r+1)·D)``: each frame with its r neighbours on each side (zeros past the ends)."""
    p = F.pad(f, (0, 0, radius, radius))
    return torch.cat([p[:, i:i + f.shape[1]] for i in range(2 * radius + 1)], -1)


@torch.no_grad()
def fit_linear_oobleck(vae, waveforms: torch.Tensor, posterior_std_bias: float = -6.0) -> dict:
    """Fit an ``AutoencoderOobleck`` in closed form as a linear lapped transform of the clips (no gradient steps).

    The network is set so that it computes exactly (up to Snake's 1e-6 term):

    - encoder: the Snake activations ≈ identity (β = 1e6), every residual unit's output conv zeroed (identity
      branch), the input conv a delta and each strided conv a space-to-depth step, so the last encoder stage holds
      the ``hop`` samples of each frame; its output conv projects a frame onto the top ``L`` principal directions of
      the training frames (uncentred second moment), scaled so the latents have unit standard deviation over the
      clips (``latent_scale`` 1, as Stable Audio Open). The posterior scale half is constant: std =
      ``softplus(posterior_std_bias)`` + 1e-4 ≈ 0.0026 (a small part of each latent: the digits lesson).
    - decoder: its input conv (kernel 7) is the least-squares synthesis of a frame's samples from the latents of it
      and its 3 neighbours on each side (with intercept), the transposed convs depth-to-space steps, the output
      conv a delta.

    Why: a waveform Oobleck trained from scratch on 2 CPU cores collapsed to near-silence (0 dB reconstruction
    SNR after 200 steps, the classifier at chance on its decodes); this fit takes seconds, keeps held-out
    reconstructions at ~16 dB and the key classifier's accuracy on them at the real clips' level (build_report.json),
    and stays a plain ``AutoencoderOobleck`` that vanilla Diffusers loads (and that can be fine-tuned further).

    Args:
        vae: an ``AutoencoderOobleck`` whose stage widths are ≥ the samples per frame at each stage (the
            ``builtin:music`` architecture). waveforms: ``(N, 1, T)`` train clips, T a multiple of the hop.

    Returns:
        ``{"latent_scale", "pca_energy_kept"}``: the std the projections were divided by, the share of the frames'
        energy in the kept directions.

    Raises:
        ValueError: a stage narrower than its samples per frame, or T not a multiple of the hop.

    Source: diffusers ``AutoencoderOobleck`` (the network, unchanged); principal component analysis and ordinary
    least squares (``torch.linalg.eigh`` / ``lstsq``) — genalign's recipe, not Stable Audio's trained autoencoder.
    """
    from diffusers.models.autoencoders.autoencoder_oobleck import OobleckResidualUnit, Snake1d

    enc, dec = vae.encoder, vae.decoder
    hop, L = int(vae.hop_length), int(vae.config.decoder_input_channels)
    if waveforms.shape[-1] % hop:
        raise ValueError(f"clip length {waveforms.shape[-1]} is not a multiple of the VAE hop {hop}")
    for m in vae.modules():
        if isinstance(m, Snake1d):
            m.alpha.zero_()
            m.beta.fill_(math.log(1e6))  # x + sin²(x)/1e6
        elif isinstance(m, OobleckResidualUnit):
            _set_weight(m.conv2, torch.zeros_like(m.conv2.weight))
            m.conv2.bias.zero_()
    # encoder: delta, then space-to-depth; channel c at cumulative hop P holds sample offset c of the frame
    w = torch.zeros_like(enc.conv1.weight)
    w[0, 0, 3] = 1.0
    _set_weight(enc.conv1, w)
    enc.conv1.bias.zero_()
    P = 1
    for block in enc.block:
        conv = block.conv1
        s, pad = conv.stride[0], conv.padding[0]
        if conv.out_channels < P * s:
            raise ValueError(f"encoder stage with {conv.out_channels} channels < {P * s} samples per frame")
        w = torch.zeros_like(conv.weight)  # (out, in, 2s)
        for j in range(s):
            for c in range(P):
                w[P * j + c, c, j + pad] = 1.0
        _set_weight(conv, w)
        conv.bias.zero_()
        P *= s
    # PCA of the frames → the mean half of the encoder's output conv (centre tap)
    f = _frames(waveforms, hop)
    flat = f.reshape(-1, hop)
    eigval, eigvec = torch.linalg.eigh(flat.T @ flat / len(flat))
    A = eigvec[:, -L:].flip(-1)  # (hop, L), largest first
    z = f @ A
    scale = float(z.std())
    A = A / scale
    z = z / scale
    w = torch.zeros_like(enc.conv2.weight)  # (2L, d_model, 3)
    w[:L, :hop, 1] = A.T.float()
    _set_weight(enc.conv2, w)
    enc.conv2.bias.zero_()
    enc.conv2.bias[L:] = posterior_std_bias
    # decoder: least-squares synthesis from 7 latent frames, then depth-to-space
    ctx = _context(z, 3).reshape(-1, 7 * L)
    ctx = torch.cat([ctx, torch.ones(len(ctx), 1, dtype=ctx.dtype)], 1)
    B = torch.linalg.lstsq(ctx, flat).solution  # (7L + 1, hop)
    if dec.conv1.out_channels < hop:
        raise ValueError(f"decoder input conv with {dec.conv1.out_channels} channels < hop {hop}")
    w = torch.zeros_like(dec.conv1.weight)  # (out, L, 7)
    w[:hop] = B[:-1].reshape(7, L, hop).permute(2, 1, 0).float()
    _set_weight(dec.conv1, w)
    dec.conv1.bias.zero_()
    dec.conv1.bias[:hop] = B[-1].float()
    for block in dec.block:
        conv = block.conv_t1  # (in, out, 2s)
        s, pad = conv.stride[0], conv.padding[0]
        Pn = P // s
        if conv.out_channels < Pn:
            raise ValueError(f"decoder stage with {conv.out_channels} channels < {Pn} samples per frame")
        w = torch.zeros_like(conv.weight)
        for j in range(s):
            for o in range(Pn):
                w[Pn * j + o, o, j + pad] = 1.0
        _set_weight(conv, w)
        conv.bias.zero_()
        P = Pn
    w = torch.zeros_like(dec.conv2.weight)
    w[0, 0, 3] = 1.0
    _set_weight(dec.conv2, w)
    return {"latent_scale": scale, "pca_energy_kept": float(eigval[-L:].sum() / eigval.sum())}


@torch.no_grad()
def encode_posterior(vae, x: torch.Tensor, batch: int = 32, desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and stds ``(N, C, L)`` of waveforms ``(N, 1, T)`` (a progress bar when ``desc`` is given)."""
    from tqdm import tqdm

    mus, stds = [], []
    for i in tqdm(range(0, len(x), batch), desc=desc, disable=desc is None):
        d = vae.encode(x[i:i + batch]).latent_dist
        mus.append(d.mean)
        stds.append(d.std)
    return torch.cat(mus), torch.cat(stds)


def _cond(pipe, prompts: list[str], seconds: float) -> dict[str, torch.Tensor]:
    """The Stable Audio adapter's conditioning, with gradients (for pretraining the text side)."""
    emb = pipe.encode_prompt(prompts, pipe.text_encoder.device, False)
    start, end = pipe.encode_duration(0.0, seconds, pipe.text_encoder.device, False, len(prompts))
    return {"encoder_hidden_states": torch.cat([emb, start, end], 1), "global_hidden_states": torch.cat([start, end], 2)}


def build_music_base(waveforms: torch.Tensor, captions: list[str], words: list[str], out_dir: str | Path = MUSIC_DIR,
                     dit_steps: int = 1500, batch_size: int = 32, seed: int = 0, progress: bool = True) -> dict:
    """Pretrain the ``builtin:music`` pipeline on rendered clips and save it (Diffusers format) to ``out_dir``.

    The VAE is fitted in closed form (:func:`fit_linear_oobleck`), then DiT + T5 + projection are trained with the
    cosine v-objective (module docstring).

    Args:
        waveforms: ``(N, 1, 16384)`` train clips (4 kHz). captions: N captions. words: tokenizer vocabulary.
        dit_steps, batch_size: DiT optimizer steps and clips per step. seed: every draw of the build.

    Returns:
        a report dict (timings, losses, VAE posterior-noise check, reconstruction SNR on the train clips), also
        written to ``out_dir/build_report.json``.
    """
    from tqdm import tqdm

    from genalign.pipelines.audio import StableAudioAdapter

    t0 = time.time()
    g = torch.Generator().manual_seed(seed)
    pipe = music_stable_audio_pipeline(words, seed=seed)
    vae = pipe.vae
    fit = fit_linear_oobleck(vae, waveforms)
    vae.eval().requires_grad_(False)
    mu, std = encode_posterior(vae, waveforms, desc="music VAE: encode clips" if progress else None)
    # reconstruction quality on an evenly spaced subset (decoding every clip is the costly part on CPU)
    sub = torch.linspace(0, len(waveforms) - 1, min(len(waveforms), 64)).long()
    with torch.no_grad():
        rec = torch.cat([vae.decode(mu[sub][i:i + 32]).sample for i in range(0, len(sub), 32)])
        snr = float(10 * torch.log10(waveforms[sub].pow(2).sum() / (rec - waveforms[sub]).pow(2).sum()))
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
        "seed": seed, "clips": len(waveforms), "dit_steps": dit_steps, "batch_size": batch_size,
        "dit_mse": round(loss.item(), 4), "vae_fit": "closed form (PCA analysis + least-squares synthesis)",
        "latent_scale": round(fit["latent_scale"], 5), "vae_pca_energy_kept": round(fit["pca_energy_kept"], 5),
        # posterior noise check (digits lesson): mean posterior std vs the std of the posterior means
        "vae_posterior_std": round(float(std.mean()), 5), "vae_latent_spread": round(float(mu.std()), 5),
        "vae_noise_to_spread": round(float(std.mean() / mu.std()), 5), "vae_reconstruction_snr_db": round(snr, 2),
        "vae_seconds": round(vae_seconds, 1), "seconds": round(time.time() - t0, 1),
    }
    (out_dir / "build_report.json").write_text(json.dumps(report, indent=2))
    return report


__all__ = [
    "DEFAULT_GUIDANCE", "DEFAULT_STEPS", "HELDOUT_PROMPTS", "HELDOUT_STATS", "HOP", "LATENT_CHANNELS", "LATENT_FRAMES",
    "MUSIC_DIR", "build_music_base", "encode_posterior", "fit_linear_oobleck", "music_asset", "music_base_path",
    "music_stable_audio_pipeline",
]
