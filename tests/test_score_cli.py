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


# -- generate / score conventions (issue 17) -----------------------------------------------------------------------
def test_generate_unknown_prompt_set_is_one_line(tmp_path, capsys):
    assert main(["generate", "builtin:digits", "--prompts", "nope:set", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("genalign generate: error: --prompts nope:set:")
    assert not (tmp_path / "o").exists()  # checked before the model loads


def test_generate_grid_upscales_tiny_images(tmp_path, capsys):
    from genalign.pipelines.tiny import tiny_sd_pipeline

    tiny_sd_pipeline().save_pretrained(tmp_path / "model")
    out = tmp_path / "samples"
    assert main(["generate", str(tmp_path / "model"), "--prompts", "digits:heldout", "--max-prompts", "2",
                 "--num-per-prompt", "3", "--steps", "2", "--out", str(out), "--grid", "--quiet"]) == 0
    assert "grid.png" in capsys.readouterr().out
    grid = Image.open(out / "grid.png").convert("RGB")
    assert grid.size == (3 * 128, 2 * 128)  # 3 samples per row, one row per prompt, 8 px images x16
    rows = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows][:3] == [rows[0]["prompt"]] * 3 and rows[3]["prompt"] != rows[0]["prompt"]
    # cell (row 1, column 2) is sample 5, upscaled with nearest-neighbour
    cell = grid.crop((2 * 128, 128, 3 * 128, 256))
    ref = Image.open(out / rows[5]["file_name"]).convert("RGB").resize((128, 128), Image.NEAREST)
    assert np.array_equal(np.asarray(cell), np.asarray(ref))


def test_score_a_single_file_empty_folder_and_non_media(tmp_path, capsys):
    _img(tmp_path / "a.png", 60)
    _img(tmp_path / "b.png", 120)
    out = tmp_path / "one.jsonl"
    assert main(["score", "--images", str(tmp_path / "b.png"), "--reward", "ink_mass", "--out", str(out),
                 "--quiet"]) == 0
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert row["ink_mass"] == pytest.approx(120 / 255, abs=1e-5) and row["file"].endswith("b.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert main(["score", "--images", str(empty), "--reward", "ink_mass", "--quiet"]) == 2
    err = capsys.readouterr()
    assert err.err.strip() == f"genalign score: error: {empty}: no image or audio files" and "nan" not in err.out
    (tmp_path / "notes.md").write_text("hello")
    assert main(["score", str(tmp_path / "notes.md"), "--reward", "ink_mass", "--quiet"]) == 2
    assert "not an image" in capsys.readouterr().err


def test_sub_folders_are_counted_or_scored_with_recursive(tmp_path, capsys):
    from genalign import api

    _img(tmp_path / "00000.png", 30)
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    _img(tmp_path / "sub" / "00001.png", 90)
    _img(tmp_path / "sub" / "deeper" / "00002.png", 150)
    res = api.score(tmp_path, ["ink_mass"], progress=False)
    assert len(res["per_sample"]) == 1 and res["skipped_subfolders"] == 2
    assert main(["score", "--images", str(tmp_path), "--reward", "ink_mass", "--quiet"]) == 0
    assert "2 in sub-folders skipped (--recursive scores them)" in " ".join(capsys.readouterr().out.split())
    res = api.score(tmp_path, ["ink_mass"], progress=False, recursive=True)
    assert [round(r["ink_mass"] * 255) for r in res["per_sample"]] == [30, 90, 150] and res["skipped_subfolders"] == 0
    only_sub = tmp_path / "sub"
    (only_sub / "00001.png").unlink()
    with pytest.raises(ValueError, match="no image or audio files; 1 in sub-folders: add --recursive"):
        api.score(only_sub, ["ink_mass"], progress=False)


def test_reward_settings_reach_the_reward(tmp_path, capsys):
    _img(tmp_path / "flat.png", 100)  # a constant image: contrast = sqrt(0 + eps)
    out = tmp_path / "s.jsonl"
    assert main(["score", "--images", str(tmp_path), "--reward", "contrast", "--out", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["contrast"] == pytest.approx(1e-6, abs=1e-6)
    assert main(["score", "--images", str(tmp_path), "--reward", "contrast", "--reward-kwargs", '{"eps": 0.25}',
                 "--out", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["contrast"] == pytest.approx(0.5)
    cfg = tmp_path / "rewards.yaml"
    cfg.write_text("rewards:\n  - {name: contrast, kwargs: {eps: 0.04}}\n  - ink_mass\n")
    assert main(["score", "--images", str(tmp_path), "--reward-config", str(cfg), "--out", str(out), "--quiet"]) == 0
    row = json.loads(out.read_text())
    assert row["contrast"] == pytest.approx(0.2) and row["ink_mass"] == pytest.approx(100 / 255, abs=1e-5)
    capsys.readouterr()
    for bad, msg in ((["--reward", "contrast", "--reward-kwargs", "{eps: 1}"], "--reward-kwargs: not valid JSON"),
                     (["--reward", "contrast", "--reward-kwargs", "[1]"], "--reward-kwargs: expected a JSON object"),
                     (["--reward", "contrast", "--reward-kwargs", '{"nope": 1}'], "reward settings")):
        assert main(["score", "--images", str(tmp_path), *bad, "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err, err
    cfg.write_text("rewards:\n  - {name: contrast, wieght: 2}\n")
    assert main(["score", "--images", str(tmp_path), "--reward-config", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--reward-config {cfg}: rewards.0.wieght" in err


def test_score_run_reuses_the_samples_training_kept(tmp_path):
    """A run whose training kept its held-out samples is scored on them (nothing drawn, no export needed)."""
    from genalign.config import load_config, save_config

    run = tmp_path / "run"
    folder = run / "samples" / "heldout-trained"
    folder.mkdir(parents=True)
    cfg = load_config(None, ["validation.max_prompts=1", "validation.samples_per_prompt=2"])
    save_config(cfg, run / "config.yaml")
    from genalign.data.prompts import load_prompts

    prompt = load_prompts(cfg.validation.prompts, 1)[0]
    for i, v in enumerate((40, 200)):
        _img(folder / f"sample_{i:05d}.png", v)
    (folder / "metadata.rank0.jsonl").write_text("".join(
        json.dumps({"file_name": f"sample_{i:05d}.png", "index": i, "prompt": prompt, "seed": 1234 + i, "sample": i,
                    "rewards": {}}) + "\n" for i in range(2)))
    out = tmp_path / "s.jsonl"
    assert main(["score", "--run", str(run), "--reward", "ink_mass", "--out", str(out), "--quiet"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [round(r["ink_mass"] * 255) for r in rows] == [40, 200] and not (folder / "generation.json").exists()
