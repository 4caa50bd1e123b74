"""LM runs through the public API and the CLI: the same run-folder contract as diffusion runs (config.yaml,
atomic checkpoints, summary.json, export/) and exact resume with ``--resume latest`` (issue 12, issue 15 item 9)."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("trl")

import genalign  # noqa: E402
from genalign.cli import main  # noqa: E402
from genalign.config import LMRunConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TREG = os.path.join(ROOT, "configs", "treg_tiny.yaml")
SMALL = ["data.synthetic.n_train=8", "data.synthetic.n_eval=0", "train.batch_size=4", "pipeline.lora.dropout=0.1"]


def _adapter(run_dir):
    return load_file(os.path.join(run_dir, "export", "adapter", "adapter_model.safetensors"))


def test_api_trains_treg_tiny_and_writes_the_run_folder(tmp_path):
    cfg = genalign.load_config(TREG, SMALL + ["train.steps=2"])
    assert isinstance(cfg, LMRunConfig) and cfg.objective.name == "treg"
    run = tmp_path / "run"
    summary = genalign.train(cfg, run, progress=False)
    assert summary["steps"] == 2 and math.isfinite(summary["last_loss"])
    assert (run / "config.yaml").exists() and genalign.load_config(run / "config.yaml") == cfg
    ck = run / "checkpoints" / "step_000002"
    assert (ck / "COMPLETE").exists() and (ck / "config.yaml").exists() and (ck / "trainer_state.json").exists()
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the staging folder is gone
    assert json.loads((run / "summary.json").read_text())["objective"] == "treg"
    page = (run / "report.html").read_text()
    assert "Training curves" in page and 'alt="loss"' in page and "run report: treg (language)" in page
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0 and (tmp_path / "r.html").exists()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(run / "export")
    assert merged.config.num_hidden_layers == 2 and (run / "export" / "adapter" / "adapter_config.json").exists()
    # the merged export equals base + trained adapter: the trained LoRA changed the model
    assert any(v.abs().sum() > 0 for k, v in _adapter(run).items() if "lora_B" in k)
    # genalign export re-exports the LM run from its newest checkpoint
    out = genalign.export(run, tmp_path / "re-export")
    for k, v in _adapter(run).items():
        assert torch.equal(v, load_file(str(out / "adapter" / "adapter_model.safetensors"))[k])


def test_cli_resume_latest_is_exact(tmp_path):
    """2 steps, then `--resume latest` to 4 steps == 4 uninterrupted steps, bit for bit (LoRA dropout 0.1 on, so
    the RNG state must be restored too)."""
    full, part = tmp_path / "full", tmp_path / "part"
    sets = [x for s in SMALL + ["train.checkpoint_every=2"] for x in ("--set", s)]
    assert main(["train", TREG, "-o", str(full), "--quiet", *sets, "--set", "train.steps=4"]) == 0
    assert main(["train", TREG, "-o", str(part), "--quiet", *sets, "--set", "train.steps=2"]) == 0
    assert main(["train", TREG, "-o", str(part), "--quiet", *sets, "--set", "train.steps=4",
                 "--resume", "latest"]) == 0
    summary = json.loads((part / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step_000002") and summary["steps"] == 4
    a, b = _adapter(full), _adapter(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and resuming really continued: the 2-step adapter differs from the 4-step one
    two = load_file(str(part / "checkpoints" / "step_000002" / "adapter_model.safetensors"))
    assert any(not torch.equal(two[k], a[k]) for k in two)


def test_lm_runs_follow_the_run_folder_rules(tmp_path, capsys):
    """A second train into a used folder is refused (no --resume / --overwrite); a resume that changes the run
    (seed) is refused naming the key; --overwrite starts over; an export never replaces foreign files."""
    run = tmp_path / "run"
    sets = [x for s in SMALL + ["train.steps=1"] for x in ("--set", s)]
    assert main(["train", TREG, "-o", str(run), "--quiet", *sets]) == 0
    assert main(["train", TREG, "-o", str(run), "--quiet", *sets]) == 2
    assert "--resume latest" in capsys.readouterr().err
    assert main(["train", TREG, "-o", str(run), "--quiet", *sets, "--set", "seed=5", "--resume", "latest"]) == 2
    assert "seed" in capsys.readouterr().err
    assert main(["train", TREG, "-o", str(run), "--quiet", *sets, "--overwrite"]) == 0
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["export", str(run), str(foreign)]) == 2
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_malformed_lm_rows_are_counted_skips_and_a_missing_file_is_one_line(tmp_path, capsys):
    good = [{"prompt": f"{a}+1=", "chosen": str(a + 1), "rejected": str(a + 2)} for a in range(10, 14)]
    bad = ['{"prompt": "1+1=", "chosen": null, "rejected": "3"}', '[1, 2]', '"a string"', '{"prompt": 7}',
           'not json {', '{"prompt": "2+2=", "chosen": 4, "rejected": "5"}', '{"prompt": "x", "chosen": "y", "rejected": "y"}']
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join([json.dumps(r) for r in good] + bad) + "\n")
    common = ["--set", "data.synthetic=null", "--set", "train.steps=1", "--set", "train.batch_size=2", "--quiet"]
    assert main(["train", TREG, "-o", str(tmp_path / "run"), "--set", f"data.train={data}", *common]) == 0
    counts = json.loads((tmp_path / "run" / "summary.json").read_text())["counts"]
    assert sum(v for k, v in counts.items() if k.startswith("bad_rows/")) == len(bad)
    assert counts["bad_rows/not_json"] == 1 and counts["bad_rows/identical_chosen_rejected"] == 1
    capsys.readouterr()
    assert main(["train", TREG, "-o", str(tmp_path / "run2"), "--set", f"data.train={tmp_path / 'nope.jsonl'}",
                 *common]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope.jsonl" in err


def test_crash_then_resume_latest_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """A run that dies after its step-2 checkpoint and is resumed with the SAME config (cosine schedule, warm-up,
    LoRA dropout) ends bit-identical to an uninterrupted run."""
    from genalign.training.lm import PreferenceTrainer

    sets = SMALL + ["train.steps=4", "train.checkpoint_every=2", "train.lr_scheduler=cosine", "train.warmup_ratio=0.25"]
    cfg = genalign.load_config(TREG, sets)
    genalign.train(cfg, tmp_path / "full", progress=False)
    original = PreferenceTrainer.training_step

    def dying_step(self, *a, **kw):
        if self.state.global_step >= 2:
            raise RuntimeError("simulated crash after the step-2 checkpoint")
        return original(self, *a, **kw)

    monkeypatch.setattr(PreferenceTrainer, "training_step", dying_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        genalign.train(cfg, tmp_path / "part", progress=False)
    monkeypatch.setattr(PreferenceTrainer, "training_step", original)
    assert not (tmp_path / "part" / "summary.json").exists()
    summary = genalign.train(cfg, tmp_path / "part", resume="latest", progress=False)
    assert summary["resumed_from"].endswith("step_000002")
    a, b = _adapter(tmp_path / "full"), _adapter(tmp_path / "part")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_truncated_latest_checkpoint_is_named_and_the_previous_one_used(tmp_path, capsys):
    run = tmp_path / "run"
    sets = SMALL + ["train.steps=4", "train.checkpoint_every=2"]
    cfg = genalign.load_config(TREG, sets)
    genalign.train(cfg, run, progress=False)
    bad = run / "checkpoints" / "step_000004" / "adapter_model.safetensors"
    bad.write_bytes(bad.read_bytes()[:100])  # COMPLETE marker present, weights truncated
    capsys.readouterr()
    assert main(["train", TREG, "-o", str(run), "--quiet", "--resume", str(bad.parent),
                 *[x for s in sets for x in ("--set", s)]]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "adapter_model.safetensors" in err
    summary = genalign.train(cfg, run, resume="latest", progress=False)
    assert summary["resumed_from"].endswith("step_000002") and summary["steps"] == 4
    assert "step_000004 is corrupt" in capsys.readouterr().out


def test_non_finite_lm_training_is_a_one_line_failure_and_exports_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    sets = SMALL + ["train.steps=2", "train.learning_rate=.inf"]
    assert main(["train", TREG, "-o", str(run), "--quiet", *[x for s in sets for x in ("--set", s)]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NaN/inf" in err[0] and "learning_rate inf" in err[0]
    assert not (run / "export").exists() and not (run / "summary.json").exists()
