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
