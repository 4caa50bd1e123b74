"""Nothing lost, nothing silently wrong: run folders, exports, checkpoints, resume checks, non-finite training
(issue "Nothing lost": items 1–7 and 10). Each test fails on the code before that issue."""

import json
import shutil

import pytest
import torch

from genalign.config import load_config
from genalign.export import EXPORT_MARKER, ExportRefusedError, export_pipeline, recover_export_swap
from genalign.registry import pipelines
from genalign.training import checkpoint as ckpt
from genalign.training import run_folder
from genalign.training.launch import check_distributed_type
from genalign.training.trainer import NonFiniteLossError, train

FAST = ["pipeline.model=tiny:sd", "validation.samples_per_prompt=1", "validation.num_inference_steps=2",
        "validation.max_prompts=2", "data.source.num_inference_steps=2", "data.source.rounds=1",
        "data.source.samples_per_prompt=2", "train.batch_size=2", "train.log_every=1", "export.report=false"]


def _cfg(*extra):
    return load_config(None, FAST + list(extra))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step run with an export and checkpoints at steps 1 and 2."""
    run = tmp_path_factory.mktemp("runs") / "run"
    train(_cfg("train.steps=2", "train.checkpoint_every=1"), run, progress=False)
    return run


def _trainable(run):
    from safetensors.torch import load_file

    return load_file(str(ckpt.list_checkpoints(run)[-1] / "trainable.safetensors"))


# -- item 1: export never replaces what genalign did not write --------------------------------------------------
def test_export_into_its_own_run_folder_is_refused_and_the_run_survives(finished_run):
    from genalign.api import export

    before = sorted(p.name for p in finished_run.iterdir())
    with pytest.raises(ExportRefusedError, match="did not export"):
        export(finished_run, finished_run)
    assert sorted(p.name for p in finished_run.iterdir()) == before
    assert ckpt.list_checkpoints(finished_run)


def test_export_into_a_folder_of_user_files_is_refused(tmp_path, finished_run):
    cfg = load_config(finished_run / "config.yaml")
    model = pipelines.get("sd").from_config(cfg.pipeline)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("do not delete")
    with pytest.raises(ExportRefusedError):
        export_pipeline(model, cfg, user)
    assert (user / "thesis.tex").read_text() == "do not delete"
    out = export_pipeline(model, cfg, tmp_path / "new")  # a new folder is fine, and then replaceable
    assert (out / EXPORT_MARKER).exists()
    export_pipeline(model, cfg, out)
    assert (out / "model_index.json").exists()
    assert oct((out).stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode (issue 17)


# -- item 4: an interrupted export swap is recovered, stale temp folders cleaned ---------------------------------
def test_interrupted_export_swap_is_recovered(tmp_path):
    out = tmp_path / "export"
    old = tmp_path / "export.old"
    old.mkdir()
    (old / EXPORT_MARKER).write_text("{}")
    (old / "model_index.json").write_text("{}")
    stale = tmp_path / "export.tmp-abc123"
    stale.mkdir()
    (stale / EXPORT_MARKER).write_text("{}")
    foreign = tmp_path / "export.tmp-user"  # not ours (no marker): left alone
    foreign.mkdir()
    recover_export_swap(out)
    assert (out / "model_index.json").exists() and not old.exists()
    assert not stale.exists() and foreign.exists()
    old.mkdir()
    (old / EXPORT_MARKER).write_text("{}")
    recover_export_swap(out)  # a leftover .old beside a complete export goes
    assert not old.exists() and out.exists()


# -- items 2 and 3: one run per folder, locked ------------------------------------------------------------------
def test_second_train_into_a_run_folder_is_refused_without_resume_or_overwrite(finished_run):
    with pytest.raises(run_folder.RunFolderError, match="--resume latest.*--overwrite"):
        train(_cfg("train.steps=1", "seed=5"), finished_run, progress=False)


def test_overwrite_starts_over_but_never_removes_user_files(tmp_path):
    run = tmp_path / "run"
    train(_cfg("train.steps=1", "export.enabled=false"), run, progress=False)
    before = json.loads((run / "reward_before.json").read_text())
    summary = train(_cfg("train.steps=1", "export.enabled=false", "seed=3"), run, progress=False, overwrite=True)
    after = json.loads((run / "reward_before.json").read_text())
    assert after["fingerprint"] != before["fingerprint"]  # not the old run's base reward
    assert summary["reward_before"] == after["reward"]
    (run / "notes.txt").write_text("mine")
    with pytest.raises(run_folder.RunFolderError, match="notes.txt"):
        train(_cfg("train.steps=1"), run, progress=False, overwrite=True)
    assert (run / "notes.txt").exists()


def test_a_file_as_output_folder_is_one_line(tmp_path):
    f = tmp_path / "out"
    f.write_text("x")
    with pytest.raises(run_folder.RunFolderError, match="is a file"):
        train(_cfg("train.steps=1"), f, progress=False)


def test_a_second_run_on_a_locked_folder_stops_at_once(tmp_path):
    lock = run_folder.lock_run_folder(tmp_path / "run")
    try:
        with pytest.raises(run_folder.RunFolderError, match="another genalign run"):
            train(_cfg("train.steps=1"), tmp_path / "run", progress=False, resume="latest")
    finally:
        lock.release()


# -- item 5: a corrupt newest checkpoint is named and the previous one used --------------------------------------
def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, finished_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    newest = ckpt.list_checkpoints(run)[-1]
    f = newest / "trainable.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert "truncated" in ckpt.verify_checkpoint(newest) or "trainable" in ckpt.verify_checkpoint(newest)
    summary = train(_cfg("train.steps=2", "train.checkpoint_every=1"), run, progress=False, resume="latest")
    assert "step_000002" in capsys.readouterr().out and summary["steps"] == 2
    with pytest.raises(FileNotFoundError, match="trainable.safetensors"):
        f.write_bytes(b"\x00" * 4)
        train(_cfg("train.steps=2"), run, progress=False, resume=str(ckpt.list_checkpoints(run)[-1]))


def test_checkpoint_files_are_flushed_before_the_marker(tmp_path, monkeypatch):
    synced = []
    real = ckpt.os.fsync
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    tmp = tmp_path / ".tmp-step_000001"
    tmp.mkdir()
    (tmp / "trainable.safetensors").write_bytes(b"x")
    ckpt.finalize_checkpoint(tmp, tmp_path / "step_000001", {"step": 1}, "")
    assert len(synced) >= 4 and (tmp_path / "step_000001" / ckpt.MARKER).exists()


# -- item 6: resume refuses a changed run -------------------------------------------------------------------------
@pytest.mark.parametrize("change,key", [("seed=1", "seed"), ("train.learning_rate=0.5", "train.learning_rate"),
                                         ("train.batch_size=1", "train.batch_size"),
                                         ("pipeline.lora.rank=2", "pipeline.lora.rank"),
                                         ("objective.name=sft", "objective.name")])
def test_resume_refuses_a_config_that_changes_the_run(tmp_path, finished_run, change, key):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with pytest.raises(run_folder.RunFolderError, match=key.replace(".", r"\.")):
        train(_cfg("train.steps=3", change), run, progress=False, resume="latest")


def test_resume_may_add_steps(tmp_path, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "export")
    summary = train(_cfg("train.steps=3", "train.checkpoint_every=1"), run, progress=False, resume="latest")
    assert summary["steps"] == 3


# -- item 7: non-finite parameters are never trained on, exported or reported as success ------------------------
def test_infinite_learning_rate_halts_naming_the_optimizer_and_exports_nothing(tmp_path):
    cfg = _cfg("train.steps=2", "train.learning_rate=.inf")
    with pytest.raises(NonFiniteLossError, match="learning_rate=inf"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "export").exists() and not (tmp_path / "run" / "summary.json").exists()


def test_export_refuses_non_finite_weights(tmp_path):
    cfg = _cfg()
    model = pipelines.get("sd").from_config(cfg.pipeline)
    with torch.no_grad():
        next(iter(model.trainable_parameters())).fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN/inf"):
        export_pipeline(model, cfg, tmp_path / "export")
    assert not (tmp_path / "export").exists()


# -- item 10: a preset whose strategy did not take effect is refused ---------------------------------------------
def test_fsdp_preset_that_runs_as_plain_multi_cpu_is_refused(monkeypatch):
    class Acc:
        distributed_type = "DistributedType.MULTI_CPU"
        num_processes, device = 2, "cpu"

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RuntimeError, match="asks for FSDP but Accelerate runs MULTI_CPU"):
        check_distributed_type(Acc())
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    check_distributed_type(Acc())


def test_auto_mixed_precision_follows_the_accelerate_config(monkeypatch):
    # Issue 17: `accelerate launch --config_file` with mixed_precision bf16 was ignored when the config said auto.
    from genalign.training.launch import resolve_mixed_precision

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert resolve_mixed_precision("auto") == "bf16"
    assert resolve_mixed_precision("no") == "no"  # an explicit genalign setting wins
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert resolve_mixed_precision("auto") == ("bf16" if torch.cuda.is_available() else "no")


def test_push_to_hub_offline_fails_before_training(tmp_path, monkeypatch):
    # Issue 17: export.push_to_hub with no network must fail at once, not after the run.
    from genalign.model_card import HubPushError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _cfg("train.steps=1", "export.push_to_hub=true", "export.hub_model_id=me/digits-mapo")
    with pytest.raises(HubPushError):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "reward_before.json").exists()  # nothing long ran


def test_a_reward_kwargs_typo_and_an_empty_prompt_file_are_config_errors(tmp_path):
    # Issue 15 item 13: both gave tracebacks (TypeError in the reward's constructor, ValueError from the prompts).
    from genalign.config import ConfigError

    with pytest.raises(ConfigError, match="rewards: .*bogus"):
        train(_cfg("train.steps=1", "rewards.0.kwargs={bogus: 1}"), tmp_path / "a", progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="validation.prompts: .*empty"):
        train(_cfg("train.steps=1", f"validation.prompts={empty}"), tmp_path / "b", progress=False)


def test_validation_images_reach_tensorboard(tmp_path):
    # Issue 17: validation images go to the trackers during training (a grid per periodic validation).
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg("train.steps=2", "validation.every=1", "train.trackers=[tensorboard]", "export.enabled=false")
    train(cfg, tmp_path / "run", progress=False)
    events = list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for e in events:
        acc = EventAccumulator(str(e))
        acc.Reload()
        tags |= set(acc.Tags().get("images", []))
    assert "val/samples" in tags
