"""DDO on real audio (issue 18 needs it): the real-data term reads a folder of clips (metadata.jsonl) for an audio
adapter and trains through the trainer on a tiny Stable Audio model, with self-play rounds."""

import json
import math

import pytest
import torch

from genalign.data.audio import save_audio, synth_clip, synth_prompt


def _clip_folder(tmp_path, sr=8000, n=6):
    rows = []
    for i, note in enumerate("CDEFGA"[:n]):
        name = f"clip_{i}.wav"
        save_audio(tmp_path / "clips" / name, synth_clip(note, "fast", "chord", sr, 0.6, seed=i), sr)  # 0.6 s > window
        rows.append({"file_name": name, "prompt": synth_prompt(note, "fast", "chord")})
    (tmp_path / "clips" / "broken.wav").write_bytes(b"not audio")
    rows.append({"file_name": "broken.wav", "prompt": "a broken clip"})
    (tmp_path / "clips" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "heldout.txt").write_text("a slow tone in C\na fast chord in G\n")
    return tmp_path / "clips"


def test_real_audio_samples_fit_the_window(tmp_path):
    from genalign.config import ImagesData, LoraConfig
    from genalign.data.exemplars import load_real_samples
    from genalign.pipelines.audio import StableAudioAdapter, tiny_stable_audio_pipeline

    folder = _clip_folder(tmp_path)
    sa = StableAudioAdapter(tiny_stable_audio_pipeline(), lora=LoraConfig(rank=2))
    wav, prompts, skipped = load_real_samples(sa, ImagesData(source=str(folder)))
    assert wav.shape == (6, 1, sa.clip_samples) and sa.clip_samples == 64 * 64  # cropped to the DiT's window
    assert prompts[0] == "a fast chord in C" and skipped["unreadable_audio"] == 1
    wav2, _, _ = load_real_samples(sa, ImagesData(source=str(folder), max_images=2))
    assert wav2.shape[0] == 2 and torch.equal(wav2, wav[:2])


@pytest.mark.parametrize("rounds", [2])
def test_ddo_trains_on_a_folder_of_audio_clips(tmp_path, rounds):
    from genalign.config import load_config
    from genalign.training.trainer import train

    folder = _clip_folder(tmp_path)
    cfg = load_config(None, [
        "pipeline.name=stable_audio", "pipeline.model=tiny:stable_audio", "pipeline.lora.rank=4",
        "pipeline.lora.target_modules=[to_q, to_k, to_v, to_out.0]", "objective.name=ddo",
        f"data.source={{kind: images, source: '{folder}'}}", "objective.num_fakes=4",
        "objective.fake_num_inference_steps=2", f"objective.rounds={rounds}", "objective.sample_batch_size=4",
        "rewards=[{name: clap, kwargs: {tiny: true, sample_rate: 8000}}]", f"validation.prompts={tmp_path / 'heldout.txt'}",
        "validation.samples_per_prompt=1", "validation.num_inference_steps=2", "train.steps=4", "train.batch_size=2",
        "train.learning_rate=0.01", "train.log_every=1", "export.enabled=false"])
    s = train(cfg, tmp_path / "run", progress=False)
    h = s["history"]
    assert s["num_rows"] == 6 and s["data_skipped"]["unreadable_audio"] == 1
    assert h[0]["loss"] == pytest.approx(5 * math.log(2), abs=1e-5)  # policy == reference at the start
    assert h[2]["round"] == 1 and h[2]["loss"] == pytest.approx(5 * math.log(2), abs=1e-5)  # and after the switch
    assert h[1]["loss"] < h[0]["loss"]  # the real-vs-fake discriminator learns on audio latents
    f0 = torch.load(tmp_path / "run" / "ddo" / "fakes_round0.pt", weights_only=True)
    assert f0["latents"].shape == (4, 8, 64)  # reference samples in the (C, T) audio latent space
    assert s["objective_metrics"]["final_round"] == 1


def test_ddo_stable_audio_recipe_validates():
    from pathlib import Path

    from genalign.config import load_config

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "ddo_stable_audio.yaml")
    assert cfg.pipeline.name == "stable_audio" and cfg.objective.name == "ddo"
    assert cfg.data.source.kind == "images" and cfg.train.mixed_precision == "no"
