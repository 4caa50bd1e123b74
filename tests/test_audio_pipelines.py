"""Text-to-music adapters (tiny Stable Audio / AudioLDM2 of the real classes) and the audio data layer."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from genalign.config import LoraConfig, load_config
from genalign.data.audio import (
    load_audio_data, load_audio_preference_pairs, load_exemplar_folder, note_frequency, read_audio, save_audio,
    synth_clip, synthetic_music_dataset,
)
from genalign.data.audio import generate_audio_files
from genalign.pipelines.audio import cosine_v_objective
from genalign.pipelines.audio import cosine_x0_from_v as x0_from_v

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sa():
    from genalign.pipelines.audio import StableAudioAdapter, tiny_stable_audio_pipeline

    return StableAudioAdapter(tiny_stable_audio_pipeline(), lora=LoraConfig(rank=4))


# -- Stable Audio: cosine v-objective ---------------------------------------------------------------------------
def test_v_target_and_x0_reconstruction(sa):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 8, 64, generator=g), torch.randn(3, 8, 64, generator=g)
    k = torch.tensor([0, 499, 999])
    t = (k.float() + 0.5) / 1000  # integer timesteps map to (k + 1/2)/T
    x_t, v = sa.add_noise(x0, eps, k), sa.target(x0, eps, k)
    a, s = torch.cos(math.pi * t / 2).view(-1, 1, 1), torch.sin(math.pi * t / 2).view(-1, 1, 1)
    assert torch.allclose(x_t, a * x0 + s * eps, atol=1e-6)
    assert torch.allclose(v, a * eps - s * x0, atol=1e-6)  # v = a·ε − s·x0, not ε and not ε − x0
    ref_xt, ref_v = cosine_v_objective(x0, eps, t)  # same as the card's pure function
    assert torch.allclose(x_t, ref_xt, atol=1e-6) and torch.allclose(v, ref_v, atol=1e-6)
    # the true v gives zero per-sample loss and exact x0; float t is accepted as is
    assert torch.allclose(sa.x0_from_prediction(x_t, v, k), x0, atol=1e-5)
    assert torch.allclose(x0_from_v(x_t, v, t), x0, atol=1e-5)
    assert torch.allclose(sa.add_noise(x0, eps, t), x_t, atol=1e-6)
    # near t = 0 the input is almost clean data, near t = 1 almost pure noise
    assert (x_t[0] - x0[0]).abs().max() < 0.01 and (x_t[2] - eps[2]).abs().max() < 0.01


def test_predict_reference_and_lora(sa):
    cond = sa.encode_prompt(["a fast chord in A", "a slow tone in C"])
    assert cond["encoder_hidden_states"].shape[0] == 2 and cond["global_hidden_states"].shape[:2] == (2, 1)
    x_t, k = torch.randn(2, 8, 64), torch.tensor([10, 700])
    with torch.no_grad():
        p = sa.predict(x_t, k, cond)
        with sa.reference() as ref:
            r = sa.predict(x_t, k, cond, unet=ref)
    assert p.shape == x_t.shape and torch.allclose(p, r)  # LoRA B = 0: policy == reference at init
    params = sa.trainable_parameters()
    assert params and all("lora" in n for n, q in sa.unet.named_parameters() if q.requires_grad)
    saved = [q.detach().clone() for q in params]
    with torch.no_grad():
        for q in params:
            q.add_(0.3 * torch.randn_like(q))
        p2 = sa.predict(x_t, k, cond)
        with sa.reference() as ref:
            r2 = sa.predict(x_t, k, cond, unet=ref)
        for q, s0 in zip(params, saved):
            q.copy_(s0)
    assert not torch.allclose(p2, r2) and torch.allclose(r2, r, atol=1e-6)  # reference = LoRA disabled
    assert torch.allclose(sa.predict(x_t, k, cond), p, atol=1e-6)  # adapters re-enabled afterwards


def test_encode_decode_and_seeded_sampling(sa):
    w = 0.5 * torch.sin(torch.linspace(0, 200, 4096)).view(1, 1, -1).repeat(2, 1, 1)
    z = sa.encode(w, torch.Generator().manual_seed(0))
    assert z.shape == (2, 8, 64)
    assert sa.decode(z).shape == (2, 1, 4096)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]  # noqa: E731
    a = sa.sample_latents(["a fast chord in A", "a slow tone in C"], 3, 1.0, gens())
    b = sa.sample_latents(["a slow tone in C"], 3, 1.0, gens()[1:])
    assert torch.allclose(a[1:], b, atol=1e-5)  # a sample does not depend on its batch-mates
    wav = sa.sample(["a fast chord in A"], num_inference_steps=2, generator=[torch.Generator().manual_seed(0)])
    assert wav.shape == (1, 1, 4096) and wav.abs().max() <= 1


def test_registered_and_recipe_config_validates():
    from genalign.registry import pipelines

    assert "stable_audio" in pipelines and "audioldm2" in pipelines
    cfg = load_config(ROOT / "configs" / "dragon_stable_audio.yaml")
    assert cfg.pipeline.name == "stable_audio" and cfg.objective.name == "dragon"
    assert [r["name"] for r in cfg.objective.model_extra["rewards"]] == ["fad-song", "clap"]


def test_export_folds_lora_into_a_loadable_pipeline(sa, tmp_path):
    from diffusers import DiffusionPipeline

    params = sa.trainable_parameters()
    saved = [q.detach().clone() for q in params]
    cond = sa.encode_prompt(["a fast chord in A"])
    x_t, k = torch.randn(1, 8, 64), torch.tensor([300])
    try:
        with torch.no_grad():
            for q in params:
                q.add_(0.2 * torch.randn_like(q))
            want = sa.predict(x_t, k, cond)
        sa.write_export(tmp_path / "exp")
    finally:
        with torch.no_grad():
            for q, s0 in zip(params, saved):
                q.copy_(s0)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "exp")
    from genalign.pipelines.audio import StableAudioAdapter

    loaded = StableAudioAdapter(pipe, lora=None, reference="none")
    with torch.no_grad():
        got = loaded.predict(x_t, k, cond)
    assert torch.allclose(got, want, atol=1e-5) and (tmp_path / "exp" / "genalign_lora.safetensors").exists()


def test_generate_audio_files_writes_wavs(tmp_path):
    from genalign.pipelines.audio import audio_adapter_for

    ad = audio_adapter_for("tiny:stable_audio")
    assert ad.ref_unet is None and not ad.trainable_parameters()
    rows = generate_audio_files(ad, ["a fast chord in A", "a slow tone in C"], tmp_path, num_inference_steps=2, seed=3)
    assert [r["file_name"] for r in rows] == ["00000.wav", "00001.wav"] and rows[1]["seed"] == 4
    y, sr = read_audio(tmp_path / "00001.wav")
    assert sr == ad.sample_rate and y.shape == (1, 4096)
    assert audio_adapter_for("tiny:sd") is None


def test_generate_audio_files_shows_progress_in_clips(tmp_path, capsys):
    from genalign.pipelines.audio import audio_adapter_for

    ad = audio_adapter_for("tiny:stable_audio")
    generate_audio_files(ad, ["a", "b", "c"], tmp_path, num_inference_steps=1, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "generate" in err and "3/3" in err and "clip" in err


# -- AudioLDM2 ---------------------------------------------------------------------------------------------------
def test_audioldm2_epsilon_ddim_adapter():
    from genalign.pipelines.audio import AudioLDM2Adapter, tiny_audioldm2_pipeline

    m = AudioLDM2Adapter(tiny_audioldm2_pipeline(), lora=LoraConfig(rank=4))
    assert m.prediction_type == "epsilon" and m.num_train_timesteps == 1000
    sc = m.noise_scheduler.config
    assert sc.beta_schedule == "scaled_linear" and sc.beta_start == 0.0015 and sc.beta_end == 0.0195
    cond = m.encode_prompt(["a fast chord in A"])
    x0 = torch.randn(1, *m.latent_shape)
    eps, k = torch.randn_like(x0), torch.tensor([400])
    abar = m.noise_scheduler.alphas_cumprod[400]
    assert torch.allclose(m.add_noise(x0, eps, k), abar.sqrt() * x0 + (1 - abar).sqrt() * eps, atol=1e-5)
    assert torch.equal(m.target(x0, eps, k), eps)
    with torch.no_grad():
        p = m.predict(m.add_noise(x0, eps, k), k, cond)
        with m.reference() as ref:
            r = m.predict(m.add_noise(x0, eps, k), k, cond, unet=ref)
    assert p.shape == x0.shape and torch.allclose(p, r)
    lat = m.sample_latents(["a fast chord in A"], 2, 1.0, [torch.Generator().manual_seed(0)])
    wav = m.decode(lat)
    assert lat.shape == (1, *m.latent_shape) and wav.ndim == 3 and torch.isfinite(wav).all()


# -- audio data ----------------------------------------------------------------------------------------------
def test_save_read_roundtrip_channels_and_resample(tmp_path):
    x = 0.5 * torch.sin(torch.linspace(0, 100, 8000))[None]
    p = save_audio(tmp_path / "a" / "x.wav", x, 8000)
    y, sr = read_audio(p)
    assert sr == 8000 and y.shape == (1, 8000) and (y - x).abs().max() < 1e-4  # PCM_16
    y2, _ = read_audio(p, channels=2, num_samples=9000)
    assert y2.shape == (2, 9000) and torch.equal(y2[0], y2[1]) and y2[:, 8000:].abs().max() == 0
    y3, sr3 = read_audio(p, sample_rate=16000)
    assert sr3 == 16000 and y3.shape[1] == 16000
    save_audio(tmp_path / "clip.wav", torch.full((2, 10), 3.0), 8000)  # clipped, not wrapped
    assert read_audio(tmp_path / "clip.wav")[0].max() <= 1.0
    for bad in (torch.zeros(1, 1, 10), torch.zeros(1, 0), torch.full((1, 4), float("nan"))):
        with pytest.raises(ValueError):
            save_audio(tmp_path / "bad.wav", bad, 8000)
    with pytest.raises(ValueError):
        save_audio(tmp_path / "bad.wav", x, 0)


def _write_pairs(tmp_path):
    for name, f in (("a", 440.0), ("b", 220.0)):
        save_audio(tmp_path / f"{name}.wav", 0.3 * torch.sin(2 * math.pi * f * torch.arange(800) / 8000)[None], 8000)
    (tmp_path / "broken.wav").write_bytes(b"not audio")
    rows = [{"prompt": "p1", "chosen": "a.wav", "rejected": "b.wav"},
            {"prompt": "p2", "chosen": "a.wav", "rejected": "b.wav", "label": 0},     # rejected actually won
            {"prompt": "p3", "chosen": "a.wav", "rejected": "b.wav", "label": 0.5},   # tie
            {"prompt": "p4", "chosen": "broken.wav", "rejected": "b.wav"},            # unreadable
            {"prompt": "p5", "chosen": "missing.wav", "rejected": "b.wav"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{bad json\n")


def test_preference_pairs_drop_ties_and_count_unreadable(tmp_path):
    _write_pairs(tmp_path)
    pairs = load_audio_preference_pairs(tmp_path / "pairs.jsonl", 8000, num_samples=800)
    assert pairs.prompts == ["p1", "p2"] and pairs.chosen.shape == (2, 1, 800)
    assert pairs.skipped["ties"] == 1 and pairs.skipped["unreadable_audio"] == 2 and pairs.skipped["bad_rows"] == 1
    assert torch.allclose(pairs.chosen[0], pairs.rejected[1]) and torch.allclose(pairs.rejected[0], pairs.chosen[1])
    with pytest.raises(ValueError):
        load_audio_preference_pairs(tmp_path / "pairs.jsonl", 8000, ties="error")


def test_exemplar_folder_and_captioned_data(tmp_path):
    _write_pairs(tmp_path)
    ex = load_exemplar_folder(tmp_path, sample_rate=8000)
    assert ex.files == ["a.wav", "b.wav"] and ex.skipped["unreadable_audio"] == 1
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.wav", "prompt": "x"}) + "\n"
                                             + json.dumps({"file_name": "broken.wav", "prompt": "y"}) + "\n")
    d = load_audio_data(tmp_path, 8000)
    assert d.prompts == ["x"] and d.skipped["unreadable_audio"] == 1


def test_synthetic_music_names_pitch_and_tempo():
    x = synth_clip("A", "fast", "tone", sample_rate=8000, duration=1.0)
    spec = np.abs(np.fft.rfft(x[0].numpy()))
    peak_hz = np.argmax(spec) * 8000 / x.shape[1]
    assert abs(peak_hz - note_frequency("A")) < 3
    env = x[0].abs().unfold(0, 400, 400).max(1).values  # 50 ms windows: 150 BPM → a strike every 0.4 s
    assert env.argmax() < 2
    d = synthetic_music_dataset(6, sample_rate=8000, duration=0.5)
    assert d.waveforms.shape == (6, 1, 4000) and all(p.startswith("a ") and " in " in p for p in d.prompts)


def test_dpo_and_kto_plumbing_on_audio_latents(sa):
    from genalign.objectives.dragon import diffusion_kto_loss, dragon_dpo_loss
    from genalign.pipelines.denoising import paired_denoising_losses, shared_noise_losses

    lat = torch.randn(4, 8, 64, generator=torch.Generator().manual_seed(1))
    cond = sa.encode_prompt(["a fast chord in A", "a slow tone in C"])
    p = paired_denoising_losses(sa, lat[:2], lat[2:], cond, torch.Generator().manual_seed(0), with_reference=True)
    lw, ll, rw, rl = p.losses_w, p.losses_l, p.ref_w, p.ref_l
    loss, _ = dragon_dpo_loss(lw, ll, rw, rl)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # (B, C, T) latents: 3-D noise repeat works
    cond4 = {k: torch.cat([v, v]) for k, v in cond.items()}
    out = shared_noise_losses(sa, lat, cond4, torch.Generator().manual_seed(0), reduction="mean")
    kto, _ = diffusion_kto_loss(out.losses, out.ref_losses, torch.tensor([1, 0, 1, 0]))
    assert kto.item() == pytest.approx(0.5, abs=1e-6) and out.losses.requires_grad


# -- Stable Audio classifier-free guidance = StableAudioPipeline's (issue 14 item 7) ---------------------------
class _CosineDDIM:
    """genalign's deterministic cosine DDIM as a scheduler object, so StableAudioPipeline runs the same sampler."""

    order, init_noise_sigma = 1, 1.0

    def set_timesteps(self, num_inference_steps, device=None):
        self.ts = torch.linspace(1.0, 0.0, num_inference_steps + 1)
        self.timesteps = self.ts[:-1].clone()

    def scale_model_input(self, x, t):
        return x

    def step(self, v, t, x, **_):
        from types import SimpleNamespace

        i = int((self.timesteps - t).abs().argmin())
        a, s = math.cos(0.5 * math.pi * self.ts[i]), math.sin(0.5 * math.pi * self.ts[i])
        a2, s2 = math.cos(0.5 * math.pi * self.ts[i + 1]), math.sin(0.5 * math.pi * self.ts[i + 1])
        return SimpleNamespace(prev_sample=a2 * (a * x - s * v) + s2 * (s * x + a * v))


def test_stable_audio_cfg_matches_the_diffusers_pipeline(sa):
    from diffusers import StableAudioPipeline

    comps = {k: v for k, v in sa.pipe.components.items()}
    comps["scheduler"] = _CosineDDIM()
    pipe = StableAudioPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    prompt, steps, cfg_scale, seed = "a fast chord in A", 4, 4.0, 7
    noise = torch.randn((8, sa.latent_frames), generator=torch.Generator().manual_seed(seed))[None]
    with torch.no_grad():
        want = pipe(prompt, num_inference_steps=steps, guidance_scale=cfg_scale, audio_end_in_s=sa.audio_seconds,
                    latents=noise.clone(), output_type="latent").audios
    got = sa.sample_latents([prompt], steps, cfg_scale, [torch.Generator().manual_seed(seed)])
    assert torch.allclose(got, want, atol=1e-5)  # same seed -> same latents as the pipeline
    assert torch.allclose(sa.decode(got), sa.decode(want).clamp(-1, 1), atol=1e-5)  # -> same audio
    # the unconditional branch keeps the global seconds embedding; zeroing it too (the old behaviour) differs
    cond = sa.encode_prompt([prompt])
    null = sa.unconditional(cond)
    assert torch.equal(null["global_hidden_states"], cond["global_hidden_states"])
    assert null["encoder_hidden_states"].abs().max() == 0
    with pytest.MonkeyPatch.context() as mp:  # restores the staticmethod itself
        mp.setattr(type(sa), "unconditional", staticmethod(lambda c: {k: torch.zeros_like(v) for k, v in c.items()}))
        wrong = sa.sample_latents([prompt], steps, cfg_scale, [torch.Generator().manual_seed(seed)])
    assert not torch.allclose(wrong, want, atol=1e-4)
    assert torch.allclose(sa.sample_latents([prompt], steps, cfg_scale, [torch.Generator().manual_seed(seed)]), want,
                          atol=1e-5)  # and the adapter is intact afterwards
