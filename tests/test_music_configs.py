"""configs/dragon_music.yaml and configs/ddo_music.yaml run end to end on tiny overrides (a random-weight model of
the builtin:music architecture, random-weight rewards, a few steps); the export loads in vanilla Diffusers."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CAPS = ["a four-voice Bach chorale in G major, 4/4, slow", "an Irish reel in D major, 2/4, fast",
        "a five-voice Palestrina mass movement in C major, 4/2, slow"]
HELD = ["a Bach chorale for four voices, slow, A minor, in 4/4", "an Irish reel, fast, E minor, in 2/4"]


@pytest.fixture(scope="module")
def tiny_music(tmp_path_factory):
    from genalign.data.music import caption_words
    from genalign.pipelines.music import music_stable_audio_pipeline

    d = tmp_path_factory.mktemp("music")
    music_stable_audio_pipeline(caption_words(), seed=0).save_pretrained(d / "model")
    (d / "train.txt").write_text("".join(c + "\n" for c in CAPS))
    (d / "heldout.txt").write_text("".join(c + "\n" for c in HELD))
    return d


TINY_REWARDS = "[{name: music_key, kwargs: {tiny: true}}, {name: music_style, kwargs: {tiny: true}}]"


def test_dragon_music_config_on_tiny_overrides(tiny_music, tmp_path):
    from diffusers import StableAudioPipeline

    from genalign.config import load_config
    from genalign.training.trainer import train

    cfg = load_config(ROOT / "configs" / "dragon_music.yaml", [
        f"pipeline.model={tiny_music / 'model'}", f"data.source.prompts={tiny_music / 'train.txt'}",
        "objective.rewards=[{name: music_clap, kwargs: {tiny: true}}, {name: music_style, kwargs: {tiny: true}}]",
        f"rewards={TINY_REWARDS}",
        f"validation.prompts={tiny_music / 'heldout.txt'}", "validation.num_inference_steps=2",
        "objective.num_inference_steps=2", "objective.prompts_per_round=2", "objective.clips_per_prompt=2",
        "objective.steps_per_round=1", "objective.win_rate_samples_per_prompt=1", "train.steps=2", "train.batch_size=2",
        "train.checkpoint_every=2"])
    assert cfg.pipeline.name == "stable_audio" and cfg.objective.name == "dragon"
    # the shipped recipe's target: the music CLAP score and music_style, two instance terms
    shipped = load_config(ROOT / "configs" / "dragon_music.yaml")
    assert [t["name"] for t in shipped.objective.rewards] == ["music_clap", "music_style"]
    s = train(cfg, tmp_path / "run", progress=False)
    om = s["objective_metrics"]
    assert om["loss"] == "dpo" and len(om["rounds"]) == 2  # instance rewards → paired DPO; one round per step
    assert set(om["terms"]) == {"music_clap", "music_style"}  # each term scored and compared on its own
    for t in om["terms"].values():
        assert {"before", "after", "win_rate", "ci_low", "ci_high"} <= set(t)
        assert 0.0 <= t["ci_low"] <= t["win_rate"] <= t["ci_high"] <= 1.0
    assert 0.0 <= om["terms"]["music_style"]["before"] <= 1.0  # p(prompted style) on the held-out captions
    assert -1.0 <= om["terms"]["music_clap"]["after"] <= 1.0  # a cosine similarity
    assert all({"reward/music_clap", "reward/music_style"} <= set(r) for r in om["rounds"])
    # validation.set_rewards: −FD of the whole validation set to the shipped held-out real-clip statistics
    assert s["reward_before"]["fad-dataset"] < 0 and s["reward_after"]["fad-dataset"] < 0
    pipe = StableAudioPipeline.from_pretrained(tmp_path / "run" / "export")  # vanilla Diffusers loads the export
    assert pipe.vae.config.sampling_rate == 4000
    assert "fad-dataset" in (tmp_path / "run" / "report.html").read_text()


def test_ddo_music_config_on_tiny_overrides(tiny_music, tmp_path):
    from genalign.config import load_config
    from genalign.data.audio import save_audio
    from genalign.data.music import SAMPLE_RATE, render_notes
    from genalign.training.trainer import train

    rows = []
    for i, cap in enumerate(CAPS):
        notes = np.array([[0.0, 2.0, 60.0 + 2 * i], [2.0, 2.0, 64.0 + 2 * i]])
        save_audio(tmp_path / "clips" / f"{i}.wav", torch.from_numpy(render_notes(notes, SAMPLE_RATE, 4.096)), SAMPLE_RATE)
        rows.append(json.dumps({"file_name": f"{i}.wav", "prompt": cap}))
    (tmp_path / "clips" / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    cfg = load_config(ROOT / "configs" / "ddo_music.yaml", [
        f"pipeline.model={tiny_music / 'model'}", f"data.source.source={tmp_path / 'clips'}", f"rewards={TINY_REWARDS}",
        f"validation.prompts={tiny_music / 'heldout.txt'}", "validation.num_inference_steps=2",
        "objective.num_fakes=3", "objective.fake_num_inference_steps=2", "objective.rounds=2",
        "objective.sample_batch_size=3", "train.steps=2", "train.batch_size=2", "train.checkpoint_every=2",
        "export.enabled=false"])
    assert cfg.objective.name == "ddo" and cfg.data.source.kind == "images"
    s = train(cfg, tmp_path / "run", progress=False)
    assert s["num_rows"] == 3
    assert np.isfinite([h["loss"] for h in s["history"]]).all()
    assert (tmp_path / "run" / "ddo" / "fakes_round0.pt").exists()


def test_ddo_music_config_reads_the_builtin_split_without_a_folder(tiny_music, tmp_path, monkeypatch):
    """`data.source.source: music:train` (the shipped recipe's source) goes from the config to DDO's real rows with
    no folder written beforehand (the corpus render is stubbed by three rendered notes)."""
    import genalign.data.music as M
    from genalign.config import load_config
    from genalign.training.trainer import train

    def three_clips(split, **kw):
        waves = torch.stack([torch.from_numpy(M.render_notes(np.array([[0.0, 2.0, 60.0 + 2 * i]]), M.SAMPLE_RATE,
                                                             4.096))[None] for i in range(3)]).float()
        return M.MusicCorpus(waves, CAPS, torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                             ["a", "b", "c"], torch.zeros(3, dtype=torch.long), M.SAMPLE_RATE, split)

    monkeypatch.setattr(M, "render_corpus", three_clips)
    cfg = load_config(ROOT / "configs" / "ddo_music.yaml", [
        f"pipeline.model={tiny_music / 'model'}", f"rewards={TINY_REWARDS}", "validation.set_rewards=[]",
        f"validation.prompts={tiny_music / 'heldout.txt'}", "validation.num_inference_steps=2",
        "objective.num_fakes=3", "objective.fake_num_inference_steps=2", "objective.rounds=1",
        "objective.sample_batch_size=3", "train.steps=1", "train.batch_size=2", "train.checkpoint_every=1",
        "export.enabled=false", "train.preflight=false"])
    assert cfg.data.source.source == "music:train"  # the shipped recipe needs no folder
    s = train(cfg, tmp_path / "run", progress=False)
    assert s["num_rows"] == 3
