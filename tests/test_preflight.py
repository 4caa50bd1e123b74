"""`genalign train` runs genalign plan's checks before loading weights (genalign.plan.preflight), and every shipped
config passes `genalign plan` offline (untraced here; the traced variant is the slow test in test_plan.py)."""

import json
import logging
from pathlib import Path

import pytest

from genalign import api
from genalign.plan import plan, print_plan
from genalign.plan import preflight as PF

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
# Full fine-tunes of 2.6-8 B networks need sharding (their headers say how they are launched).
BIG_FULL_FT = {"treg_llama3.yaml": "fsdp", "di_star_sdxl.yaml": "fsdp", "mapo_sdxl_paper.yaml": "zero2",
               "dpo_sdxl_paper.yaml": "zero2"}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_passes_plan_offline_untraced(name, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = plan(f"configs/{name}", gpus=8, gpu_memory=80, parallelism=BIG_FULL_FT.get(name, "ddp"), trace=False)
    assert p.problems == [] and p.fits, p.problems
    assert p.components and p.components[0].total > 0  # the real architecture was built (parameters counted)
    print_plan(p)
    assert "estimated peak memory per GPU" in capsys.readouterr().out


def _no_trainer(monkeypatch):
    """Make loading weights an error: the preflight must refuse first."""
    import genalign.training.trainer as T

    def boom(*a, **k):
        raise AssertionError("the trainer ran (weights would have been loaded)")

    monkeypatch.setattr(T, "train", boom)


def test_train_refuses_missing_data_before_loading_weights(tmp_path, monkeypatch):
    _no_trainer(monkeypatch)
    monkeypatch.setattr(PF, "gpu_memory_gib", lambda: None)
    cfg = api.load_config(ROOT / "configs" / "mapo_sdxl.yaml", [f"data.source.source={tmp_path / 'no-such-dir'}"])
    with pytest.raises(PF.PreflightError, match=r"would not start: data\.source .*no-such-dir.*not found"):
        api.train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # nothing written
    # the switch: with train.preflight=false the trainer is reached (and here raises the sentinel)
    cfg = api.load_config(ROOT / "configs" / "mapo_sdxl.yaml",
                          [f"data.source.source={tmp_path / 'no-such-dir'}", "train.preflight=false"])
    with pytest.raises(AssertionError, match="the trainer ran"):
        api.train(cfg, tmp_path / "run", progress=False)


def test_gpu_memory_check_refuses_what_cannot_fit(tmp_path, monkeypatch):
    _no_trainer(monkeypatch)
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = api.load_config("configs/mapo_sdxl.yaml")
    untraced = plan("configs/mapo_sdxl.yaml", gpu_memory=80, trace=False).peak / 2**30  # ≈ 12 GiB, no activations
    monkeypatch.setattr(PF, "gpu_memory_gib", lambda: untraced - 1.0)
    with pytest.raises(PF.PreflightError, match=r"optimizer state alone need \d+\.\d GiB per GPU > .* GiB on this GPU"):
        api.train(cfg, tmp_path / "run", progress=False)
    monkeypatch.setattr(PF, "gpu_memory_gib", lambda: untraced + 1.0)
    p = PF.preflight(cfg)
    assert not p.problems
    # an 8-B full fine-tune does not fit one 80 GB GPU, but does under FSDP on 8 (the launch's environment)
    lm = api.load_config("configs/treg_llama3.yaml", ["data.train=rows.jsonl"])
    monkeypatch.setattr(PF, "gpu_memory_gib", lambda: 80.0)
    monkeypatch.setattr(PF, "check_lm_data", lambda *a, **k: None)
    monkeypatch.setattr("genalign.plan.estimate.check_lm_data", lambda *a, **k: None)
    with pytest.raises(PF.PreflightError, match="1 process"):
        PF.preflight(lm)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert PF.launch_layout() == (8, "fsdp")
    assert not PF.preflight(lm).problems


def test_a_video_cut_by_max_length_is_refused_before_the_7b_model_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(PF, "gpu_memory_gib", lambda: None)
    rows = tmp_path / "train.jsonl"
    rows.write_text(json.dumps({"prompt": "What happens?", "chosen": "a", "rejected": "b", "video": "v.mp4"}) + "\n")
    ok = api.load_config("configs/rrpo_llava_video.yaml", [f"data.train={rows}"])
    assert any("video tokens" in s for s in PF.preflight(ok).sequence)
    cut = api.load_config("configs/rrpo_llava_video.yaml", [f"data.train={rows}", "data.max_length=2048"])
    with pytest.raises(PF.PreflightError, match="video would be cut"):
        api.train(cut, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_cli_train_prints_the_refusal_in_one_line(tmp_path, capsys):
    from genalign.cli import main

    code = main(["train", str(ROOT / "configs" / "quickstart.yaml"), "-o", str(tmp_path / "run"), "--quiet",
                 "--set", f"data.source.prompts={tmp_path / 'missing.txt'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "would not start" in err and "missing.txt" in err
    assert not (tmp_path / "run").exists()


def test_lm_rows_use_the_trainers_own_checks(tmp_path, monkeypatch, caplog):
    """Some malformed rows: a data line (the trainer skips and counts them). None usable: refused. RRPO rows in the
    official loader's field names (question / answer / pred / media_path) are usable."""
    monkeypatch.setattr(PF, "gpu_memory_gib", lambda: None)
    treg = ROOT / "configs" / "treg_tiny.yaml"
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"}) + "\nnot json\n"
                     + json.dumps({"prompt": "x"}) + "\n")
    with caplog.at_level(logging.WARNING, logger="genalign.data.jsonl"):
        p = PF.preflight(api.load_config(treg, ["data.synthetic=null", f"data.train={mixed}"]))
    assert any("1 of the first 3 rows usable" in s and "not_json 1" in s for s in p.data), p.data
    # the counts are the pre-flight's report; the per-row warnings stay the trainer's (logged once, not twice)
    assert not [r for r in caplog.records if "skipped (" in r.getMessage()]
    from collections import Counter

    from genalign.data.jsonl import read_checked_jsonl, text_row_problem

    with caplog.at_level(logging.WARNING, logger="genalign.data.jsonl"):
        read_checked_jsonl(str(mixed), text_row_problem, Counter())
    assert len([r for r in caplog.records if "skipped (" in r.getMessage()]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n" + json.dumps({"prompt": "y", "chosen": "a", "rejected": "a"}) + "\n")
    with pytest.raises(PF.PreflightError, match=r"none of the first 2 rows is usable \(identical_chosen_rejected 1, "
                                                r"missing_chosen_rejected 1\)"):
        PF.preflight(api.load_config(treg, ["data.synthetic=null", f"data.train={bad}"]))
    rrpo = tmp_path / "rrpo.jsonl"
    rrpo.write_text(json.dumps({"question": "What happens?", "answer": "a red cat", "pred": "a big cat",
                                "media_path": "v0"}) + "\n")
    monkeypatch.chdir(ROOT)
    p = PF.preflight(api.load_config("configs/rrpo_llava_video.yaml", [f"data.train={rrpo}"]))
    assert any("1 of the first 1 rows usable" in s for s in p.data), p.data
