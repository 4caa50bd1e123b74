"""`genalign score` (--images / --audio / --run, prompt matching, aggregate table, outputs) and `genalign relabel`."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from genalign.cli import main
from genalign.evaluation.relabel import relabel_pairs
from genalign.evaluation.scoring import collect_samples, score_samples


def _img(path, value, size=(12, 12)):
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """A run folder without training: config.yaml + a Diffusers export of the tiny SD pipeline (fast)."""
    from genalign.config import load_config, save_config
    from genalign.pipelines.tiny import tiny_sd_pipeline

    run = tmp_path_factory.mktemp("score") / "run"
    run.mkdir()
    cfg = load_config(None, ["pipeline.model=tiny:sd", "validation.max_prompts=2", "validation.samples_per_prompt=2",
                             "validation.num_inference_steps=2"])
    save_config(cfg, run / "config.yaml")
    tiny_sd_pipeline(seed=1).save_pretrained(run / "export")
    return run


def test_images_flag_comma_rewards_table_and_csv(tmp_path, capsys):
    for i in range(3):
        _img(tmp_path / f"s_{i}.png", 60 * (i + 1))
    (tmp_path / "s_1.txt").write_text("a two")
    out = tmp_path / "o" / "scores.csv"
    assert main(["score", "--images", str(tmp_path), "--reward", "ink_mass,contrast", "--reward", "vendi",
                 "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    for word in ("ink_mass", "contrast", "vendi (set)", "mean", "std", "3 image"):
        assert word in text
    rows = list(csv.DictReader(open(out)))
    assert [r["prompt"] for r in rows] == ["", "a two", ""]
    assert float(rows[2]["ink_mass"]) == pytest.approx(180 / 255, abs=1e-5)
    # the positional form still works and gives the same numbers
    assert main(["score", str(tmp_path), "--reward", "ink_mass", "--out", str(tmp_path / "p.jsonl"), "--quiet"]) == 0
    rec = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["ink_mass"] for r in rec] == pytest.approx([float(r["ink_mass"]) for r in rows])


def test_prompts_file_by_number_in_name_and_by_manifest(tmp_path):
    for i in (2, 0):
        _img(tmp_path / f"{i:05d}.png", 100)
    plist = tmp_path / "p.txt"
    plist.write_text("zero\none\ntwo\n")
    assert collect_samples(tmp_path, prompts=plist) == [(tmp_path / "00000.png", "zero"), (tmp_path / "00002.png", "two")]
    man = tmp_path / "elsewhere" / "m.jsonl"
    man.parent.mkdir()
    man.write_text(json.dumps({"file_name": "00002.png", "prompt": "deux"}) + "\n")
    assert collect_samples(tmp_path, prompts=man) == [(tmp_path / "00002.png", "deux")]
    # unnumbered names: paired in sorted order only when the counts match
    other = tmp_path / "other"
    other.mkdir()
    _img(other / "a.png", 1), _img(other / "b.png", 2)
    two = tmp_path / "t.txt"
    two.write_text("x\ny\n")
    assert [p for _, p in collect_samples(other, prompts=two)] == ["x", "y"]
    with pytest.raises(ValueError, match="cannot match 2 files to 3 prompts"):
        collect_samples(other, prompts=plist)
    assert main(["score", "--images", str(other), "--prompts", str(plist), "--reward", "ink_mass", "--quiet"]) == 2


def test_user_errors_exit_2(tmp_path, capsys):
    _img(tmp_path / "a.png", 5)
    assert main(["score", "--images", str(tmp_path), "--reward", "no-such-reward", "--quiet"]) == 2
    assert "unknown reward 'no-such-reward'" in capsys.readouterr().err
    assert main(["score", "--reward", "ink_mass"]) == 2  # nothing to score
    assert main(["score", "--images", str(tmp_path)]) == 2  # no reward
    assert main(["score", "--images", str(tmp_path / "missing"), "--reward", "ink_mass"]) == 2
    assert main(["score", "--audio", str(tmp_path), "--reward", "ink_mass", "--quiet"]) == 2  # image reward, audio
    assert "not audio samples" in capsys.readouterr().err


def test_audio_folder_with_tiny_clap(tmp_path):
    sf = pytest.importorskip("soundfile")
    t = np.arange(8000) / 16000
    for i, f in enumerate((440.0, 880.0)):
        sf.write(tmp_path / f"{i:03d}.wav", (0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32), 16000)
    (tmp_path / "prompts.txt").write_text("a low tone\na high tone\n")
    res = score_samples(tmp_path, [{"name": "clap", "kwargs": {"tiny": True, "sample_rate": 48000}}],
                        prompts=tmp_path / "prompts.txt")
    assert res["modality"] == "audio" and res["skipped"] == 0
    assert [r["prompt"] for r in res["per_sample"]] == ["a low tone", "a high tone"]
    from genalign.rewards.clap import CLAPScore

    x = torch.stack([torch.from_numpy(sf.read(tmp_path / f"{i:03d}.wav", dtype="float32", always_2d=True)[0].T.copy())
                     for i in range(2)])
    ref = CLAPScore(tiny=True).score(x, ["a low tone", "a high tone"], sample_rate=16000)  # the file's rate wins
    torch.testing.assert_close(torch.tensor([r["clap"] for r in res["per_sample"]]), ref, atol=1e-4, rtol=1e-4)


def test_score_run_generates_then_reuses(fake_run, tmp_path, capsys):
    out = tmp_path / "run_scores.jsonl"
    assert main(["score", "--run", str(fake_run), "--reward", "ink_mass", "--out", str(out), "--quiet"]) == 0
    folder = fake_run / "samples" / "heldout-trained"
    meta = [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [m["seed"] for m in meta] == [1234, 1235, 1236, 1237] and meta[0]["prompt"] == meta[1]["prompt"]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 4 and all(0 <= r["ink_mass"] <= 1 for r in rows)
    stamp = (folder / "00000.png").stat().st_mtime_ns
    # default rewards = the run's config rewards; both models; the cached trained samples are reused
    assert main(["score", "--run", str(fake_run), "--which", "both", "--out", str(tmp_path / "b.csv"), "--quiet"]) == 0
    assert (folder / "00000.png").stat().st_mtime_ns == stamp
    both = list(csv.DictReader(open(tmp_path / "b.csv")))
    assert [r["model"] for r in both] == ["base"] * 4 + ["trained"] * 4 and "digit_classifier" in both[0]
    assert "digit_classifier" in capsys.readouterr().out
    # trained export of another seed than the base: same noise, different images
    a = np.asarray(Image.open(fake_run / "samples" / "heldout-base" / "00000.png"))
    b = np.asarray(Image.open(folder / "00000.png"))
    assert a.shape == b.shape == (8, 8, 3) and not np.array_equal(a, b)


def test_score_run_without_export_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("pipeline: {model: 'tiny:sd'}\n")
    assert main(["score", "--run", str(tmp_path), "--reward", "ink_mass", "--quiet"]) == 2
    assert "no Diffusers export" in capsys.readouterr().err


# -- relabel ----------------------------------------------------------------------------------------------------
def test_relabel_jsonl_pairs(tmp_path, capsys):
    from genalign.data.preference import load_preference_pairs

    d = tmp_path / "data"
    d.mkdir()
    for name, v in {"bright": 220, "dark": 30, "mid": 120, "mid2": 120}.items():
        _img(d / f"{name}.png", v)
    rows = [{"prompt": "agree", "chosen": "bright.png", "rejected": "dark.png"},
            {"prompt": "flip", "chosen": "dark.png", "rejected": "mid.png"},
            {"prompt": "tie", "chosen": "mid.png", "rejected": "mid2.png"},
            {"prompt": "orig tie", "chosen": "mid.png", "rejected": "bright.png", "label": 0.5},
            {"prompt": "broken", "chosen": "missing.png", "rejected": "dark.png"}]
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    out = tmp_path / "out" / "relabelled.jsonl"
    assert main(["relabel", str(d / "pairs.jsonl"), "--reward", "ink_mass", "--out", str(out), "--quiet",
                 "--batch-size", "2"]) == 0
    msg = capsys.readouterr().out
    assert "wrote 3 pairs" in msg and "dropped 1 ties" in msg and "50.0%" in msg and "1 flipped" in msg
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(g["prompt"], g["chosen"].split("/")[-1], g["agrees"]) for g in got] == [
        ("agree", "bright.png", True), ("flip", "mid.png", False), ("orig tie", "bright.png", None)]
    assert all(g["reward_chosen"] > g["reward_rejected"] and g["label"] == 1.0 for g in got)
    back = load_preference_pairs(str(out), resolution=8)
    assert len(back) == 3 and bool((back.chosen.mean((1, 2, 3)) > back.rejected.mean((1, 2, 3))).all())


def test_relabel_pickapic_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("datasets")

    def enc(v, fmt):
        buf = io.BytesIO()
        Image.fromarray(np.full((10, 10, 3), v, dtype=np.uint8)).save(buf, format=fmt)
        return buf.getvalue()

    table = pa.table({"caption": ["a", "b", "c"],
                      "jpg_0": [enc(200, "PNG"), enc(10, "PNG"), enc(90, "PNG")],
                      "jpg_1": [enc(20, "JPEG"), enc(250, "PNG"), enc(90, "PNG")],
                      "label_0": [0.0, 0.0, 1.0], "label_1": [1.0, 1.0, 0.0]})
    src = tmp_path / "pap"
    src.mkdir()
    pq.write_table(table, src / "train-0.parquet")
    st = relabel_pairs(src, "ink_mass", tmp_path / "r.jsonl", batch_size=4)
    assert (st["pairs"], st["ties"], st["flipped"]) == (2, 1, 1) and st["agreement"] == pytest.approx(0.5)
    got = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert got[0]["chosen"] == "r_images/0000000_0.png" and got[0]["rejected"] == "r_images/0000000_1.jpg"
    assert got[1]["chosen"] == "r_images/0000001_1.png" and got[1]["agrees"] is True
    assert (tmp_path / "r_images" / "0000000_1.jpg").read_bytes() == table["jpg_1"][0].as_py()  # bytes unchanged
    with pytest.raises(ValueError, match="instance image reward"):
        relabel_pairs(src, "vendi", tmp_path / "v.jsonl")


@pytest.mark.parametrize("cmd", ["relabel", "report"])
def test_new_commands_have_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0 and "usage: genalign " + cmd in capsys.readouterr().out
