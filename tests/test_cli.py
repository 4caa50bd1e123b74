"""CLI: help texts, list, generate, export; the offline missing-model error."""

import json

import pytest

from genalign.cli import main
from genalign.pipelines.base import load_diffusers_pipeline
from genalign.rewards.base import WeightsNotFoundError


@pytest.mark.parametrize("cmd", ["train", "generate", "export", "score", "list"])
def test_every_command_has_complete_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: genalign " + cmd in out


def test_train_help_names_its_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for opt in ["--output-dir", "--resume", "--set", "summary.json"]:
        assert opt in out


def test_list_shows_registries(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "mapo" in out and "diffusion_dpo" in out and "digit_classifier" in out and "sdxl" in out


def test_offline_missing_model_says_how_to_provide_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="local Diffusers folder.*HF_HUB_OFFLINE"):
        load_diffusers_pipeline("no-such-org/no-such-model")


def test_generate_and_export_commands(tmp_path, capsys):
    from genalign.pipelines.tiny import tiny_sd_pipeline

    tiny_sd_pipeline().save_pretrained(tmp_path / "model")
    assert main(["generate", str(tmp_path / "model"), "--prompts", "digits:heldout", "--max-prompts", "2",
                 "--steps", "2", "--out", str(tmp_path / "samples")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "samples" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and (tmp_path / "samples" / rows[0]["file_name"]).exists()
    # score the generated folder with a registered reward
    assert main(["score", str(tmp_path / "samples"), "--reward", "digit_classifier",
                 "--out", str(tmp_path / "scores.jsonl")]) == 0
    assert "digit_classifier" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "no-run"), str(tmp_path / "out")]) == 2


def test_score_condition_dataset(tmp_path, capsys):
    """`genalign score --conditions`: real digits scored against their own stroke masks give IoU ≈ 1; against
    another digit's mask much lower."""
    from PIL import Image

    from genalign.data.digits import load_digits_split

    x, _ = load_digits_split("test")
    rows = []
    for i in range(6):
        img = Image.fromarray((x[i].permute(1, 2, 0).numpy() * 255).astype("uint8"))
        img.save(tmp_path / f"g{i}.png")
        mask = Image.fromarray(((x[i].mean(0) > 0.5).numpy() * 255).astype("uint8")).convert("RGB")
        mask.save(tmp_path / f"c{i}.png")
        rows.append({"file_name": f"g{i}.png", "condition": f"c{i}.png"})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["score", "--conditions", str(tmp_path), "--reward", "digit_stroke_mask", "--metric", "mask_iou",
                 "--out", str(tmp_path / "res.json")]) == 0
    same = json.loads((tmp_path / "res.json").read_text())["value"]
    shuffled = [dict(r, condition=rows[(i + 1) % 6]["condition"]) for i, r in enumerate(rows)]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shuffled))
    assert main(["score", "--conditions", str(tmp_path), "--reward", "digit_stroke_mask", "--metric", "mask_iou",
                 "--out", str(tmp_path / "res2.json")]) == 0
    other = json.loads((tmp_path / "res2.json").read_text())["value"]
    assert same > 0.8 and other < same - 0.2
    assert "mask_iou" in capsys.readouterr().out


def test_list_objectives_shows_lm_and_diffusion_dpo_apart(capsys):
    assert main(["list", "objectives"]) == 0
    out = capsys.readouterr().out
    for name in ("dpo", "rpo", "fdpo", "treg", "rrpo", "diffusion_dpo"):
        assert f"  {name} " in out
    assert main(["list", "pipelines"]) == 0
    out = capsys.readouterr().out
    assert "  language " in out and "  video_language " in out
