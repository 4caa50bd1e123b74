"""The builtin:music base (genalign.pipelines.music): architecture, VAE recipe pieces, loading."""

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
    assert (ad.sample_rate, ad.hop_length, ad.latent_frames) == (4000, 128, 128)
    assert abs(ad.audio_seconds - 4.096) < 1e-9
    # every caption word is one token (no <unk>)
    ids = loaded.tokenizer("a four-voice Bach chorale in F sharp minor, 6/8, moderate").input_ids
    assert loaded.tokenizer.unk_token_id not in ids
    wav = ad.sample(["an Irish reel in D major, 2/4, fast"], num_inference_steps=2,
                    generator=[torch.Generator().manual_seed(0)])
    assert wav.shape == (1, 1, 16384) and wav.abs().max() <= 1


def test_posterior_starts_quiet():
    # the first build's VAE kept softplus(0) ≈ 0.69 posterior std: latents were mostly noise
    vae = _fresh_vae()
    mu, std = PM.encode_posterior(vae, 0.3 * torch.randn(3, 1, 2048))
    assert std.max() < 0.01 and std.mean() < 0.05 * mu.std()


def test_multi_resolution_stft_loss():
    x = torch.randn(2, 1, 4096)
    assert PM.multi_resolution_stft_loss(x, x).item() == 0.0
    y = x.clone().requires_grad_(True)
    loss = PM.multi_resolution_stft_loss(y + 0.1 * torch.randn_like(x), x)
    assert loss > 0
    loss.backward()
    assert torch.isfinite(y.grad).all()
    # magnitude-only: a sign flip (phase shift by π) costs (almost) nothing, unlike L1 on waveforms
    assert PM.multi_resolution_stft_loss(-x, x) < 1e-4


def _fresh_vae():
    # weight-normed Oobleck modules cannot be deep-copied after a forward: build a new one (same seed)
    return PM.music_stable_audio_pipeline(caption_words(), seed=0).vae


def test_normalize_vae_latents_is_an_exact_reparametrisation():
    vae = _fresh_vae().eval()
    x = 0.3 * torch.randn(6, 1, 2048)
    mu0, _ = PM.encode_posterior(vae, x)
    with torch.no_grad():
        rec0 = vae.decode(mu0).sample
    s = PM.normalize_vae_latents(vae, x)
    mu1, _ = PM.encode_posterior(vae, x)
    with torch.no_grad():
        rec1 = vae.decode(mu1).sample
    assert abs(s - float(mu0.std())) < 1e-6
    assert abs(float(mu1.std()) - 1.0) < 1e-4
    assert torch.allclose(mu1, mu0 / s, atol=1e-5)
    assert torch.allclose(rec1, rec0, atol=1e-5)  # same autoencoder, rescaled latent space


def test_fit_audio_vae_is_deterministic():
    x = 0.3 * torch.randn(4, 1, 4096)
    a, b = _fresh_vae(), _fresh_vae()
    la = PM.fit_audio_vae(a, x, 2, 2, 1024, 1e-6, torch.Generator().manual_seed(0))
    lb = PM.fit_audio_vae(b, x, 2, 2, 1024, 1e-6, torch.Generator().manual_seed(0))
    assert la == lb
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_build_music_base_tiny_run_writes_a_loadable_folder_and_report(tmp_path):
    caps = ["a four-voice Bach chorale in G major, 4/4, slow", "an Irish reel in D major, 2/4, fast"] * 2
    x = 0.3 * torch.randn(4, 1, 16384)
    rep = PM.build_music_base(x, caps, caption_words(), tmp_path / "base", vae_steps=1, dit_steps=1, batch_size=2,
                              vae_batch=2, vae_crop=1024, progress=False)
    for k in ("vae_noise_to_spread", "vae_posterior_std", "vae_latent_spread", "vae_reconstruction_snr_db", "dit_mse"):
        assert k in rep
    assert abs(rep["vae_latent_spread"] - 1.0) < 1e-3  # latents normalised before the DiT is trained
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
    assert rep["vae_noise_to_spread"] < 0.2  # the posterior noise is a small part of each latent
