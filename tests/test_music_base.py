"""The builtin:music base (genalign.pipelines.music): architecture, the closed-form VAE fit, loading."""

import json

import pytest
import torch

from genalign.data.music import caption_words
from genalign.pipelines import music as PM


@pytest.fixture(scope="module")
def pipe():
    return PM.music_stable_audio_pipeline(caption_words(), seed=0)


def test_architecture_saves_and_loads_in_vanilla_stable_audio_pipeline(pipe, tmp_path):
    from diffusers import StableAudioPipeline

    from genalign.pipelines.audio import StableAudioAdapter

    pipe.save_pretrained(tmp_path / "m")
    idx = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert idx["_class_name"] == "StableAudioPipeline"
    loaded = StableAudioPipeline.from_pretrained(tmp_path / "m")
    ad = StableAudioAdapter(loaded, lora=None, reference="none")
    assert (ad.sample_rate, ad.hop_length, ad.latent_frames) == (4000, 64, 256)
    assert abs(ad.audio_seconds - 4.096) < 1e-9
    # every caption word is one token (no <unk>)
    ids = loaded.tokenizer("a four-voice Bach chorale in F sharp minor, 6/8, moderate").input_ids
    assert loaded.tokenizer.unk_token_id not in ids
    wav = ad.sample(["an Irish reel in D major, 2/4, fast"], num_inference_steps=2,
                    generator=[torch.Generator().manual_seed(0)])
    assert wav.shape == (1, 1, 16384) and wav.abs().max() <= 1


def _frame_subspace_clips(n: int, rank: int = 8, hop: int = 64, frames: int = 256, seed: int = 0) -> torch.Tensor:
    """Clips whose every hop-long frame lies in one fixed ``rank``-dim subspace: a linear autoencoder with ≥ rank
    latent channels must reconstruct them exactly."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, hop, generator=torch.Generator().manual_seed(123))
    coef = torch.randn(n, frames, rank, generator=g)
    return (0.05 * coef @ basis).reshape(n, 1, frames * hop)


def test_fit_linear_oobleck_is_the_pca_and_reconstructs_a_subspace_exactly():
    vae = _fresh_vae().eval()
    x = _frame_subspace_clips(6)
    fit = PM.fit_linear_oobleck(vae, x)
    assert fit["pca_energy_kept"] == pytest.approx(1.0, abs=1e-9)  # rank 8 ≤ 32 latent channels
    mu, std = PM.encode_posterior(vae, x)
    assert mu.shape == (6, PM.LATENT_CHANNELS, 256)
    assert float(mu.std()) == pytest.approx(1.0, rel=1e-3)  # unit-std latents (latent_scale 1)
    assert std.max() < 0.003 and float(std.mean() / mu.std()) < 0.003  # the posterior noise is negligible
    # the Oobleck encoder computes a linear map of each frame alone (frames @ principal directions / scale)
    f = x[:, 0].reshape(6, 256, 64).double().reshape(-1, 64)
    z = mu.permute(0, 2, 1).double().reshape(-1, PM.LATENT_CHANNELS)
    w = torch.linalg.lstsq(f, z).solution
    assert (f @ w - z).norm() / z.norm() < 1e-4
    # ... onto the principal directions, largest first: the 8-dim subspace fills the first 8 channels
    assert z[:, 8:].abs().max() < 1e-3 * z[:, :8].abs().max()
    var = z.var(0)
    assert torch.all(var[:7] >= var[1:8] * (1 - 1e-6))
    with torch.no_grad():
        rec = vae.decode(mu).sample
    snr = 10 * torch.log10(x.pow(2).sum() / (rec - x).pow(2).sum())
    assert snr > 50, snr  # exact up to float32 and Snake's 1e-6 term


def test_fit_linear_oobleck_round_trips_through_vanilla_diffusers(tmp_path):
    from diffusers import AutoencoderOobleck

    vae = _fresh_vae().eval()
    x = _frame_subspace_clips(4, rank=40)  # more structure than channels: a lossy fit
    PM.fit_linear_oobleck(vae, x)
    vae.save_pretrained(tmp_path / "vae")
    loaded = AutoencoderOobleck.from_pretrained(tmp_path / "vae").eval()
    with torch.no_grad():
        a = vae.decode(vae.encode(x).latent_dist.mean).sample
        b = loaded.decode(loaded.encode(x).latent_dist.mean).sample
    assert torch.equal(a, b)
    assert 5 < float(10 * torch.log10(x.pow(2).sum() / (a - x).pow(2).sum())) < 40  # lossy, not garbage


def test_fit_linear_oobleck_refuses_a_clip_length_off_the_hop():
    with pytest.raises(ValueError, match="multiple of the VAE hop 64"):
        PM.fit_linear_oobleck(_fresh_vae(), torch.zeros(2, 1, 1000))


def _fresh_vae():
    # weight-normed Oobleck modules cannot be deep-copied after a forward: build a new one (same seed)
    return PM.music_stable_audio_pipeline(caption_words(), seed=0).vae


def test_build_music_base_tiny_run_writes_a_loadable_folder_and_report(tmp_path):
    caps = ["a four-voice Bach chorale in G major, 4/4, slow", "an Irish reel in D major, 2/4, fast"] * 2
    x = 0.3 * torch.randn(4, 1, 16384)
    rep = PM.build_music_base(x, caps, caption_words(), tmp_path / "base", dit_steps=1, batch_size=2, progress=False)
    for k in ("vae_noise_to_spread", "vae_posterior_std", "vae_latent_spread", "vae_reconstruction_snr_db", "dit_mse"):
        assert k in rep
    assert abs(rep["vae_latent_spread"] - 1.0) < 1e-3  # unit-std latents before the DiT is trained
    assert json.loads((tmp_path / "base" / "build_report.json").read_text()) == rep
    from diffusers import StableAudioPipeline

    StableAudioPipeline.from_pretrained(tmp_path / "base")


def test_builtin_music_resolves_to_the_shipped_folder_or_says_how_to_build():
    from genalign.pipelines.base import resolve_model_path

    if (PM.MUSIC_DIR / "model_index.json").exists():
        assert resolve_model_path("builtin:music") == str(PM.MUSIC_DIR)
    else:
        with pytest.raises(FileNotFoundError, match="build_music.py"):
            resolve_model_path("builtin:music")


@pytest.mark.skipif(not (PM.MUSIC_DIR / "model_index.json").exists(), reason="builtin:music not built")
def test_shipped_base_loads_in_vanilla_diffusers_and_its_vae_is_not_mostly_noise():
    from diffusers import StableAudioPipeline

    pipe = StableAudioPipeline.from_pretrained(PM.music_base_path())
    assert pipe.vae.config.sampling_rate == 4000
    rep = json.loads((PM.MUSIC_DIR / "build_report.json").read_text())
    assert rep["vae_noise_to_spread"] < 0.01  # the posterior noise is a small part of each latent
    assert rep["vae_reconstruction_snr_db"] > 10  # the first (gradient-trained) VAE decoded near-silence: 0 dB
