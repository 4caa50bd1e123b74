"""Multi-process (gloo, CPU) training equals single-process training with the same global batch; signals
checkpoint and resume exactly. These start real training processes (torchrun / the CLI)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genalign.training.checkpoint import list_checkpoints

BIN = Path(sys.executable).parent
# The quickstart config (the CLI's default: MaPO + LoRA) on the tiny SD pipeline, with the LoRA-off reference path, as issue 8 asks.
COMMON = ["--quiet", "--set", "pipeline.model=tiny:sd", "--set", "objective={name: mapo}", "--set", "pipeline.lora.rank=8",
          "--set", "pipeline.reference=adapter_off", "--set", "validation.samples_per_prompt=1",
          "--set", "validation.num_inference_steps=2", "--set", "validation.max_prompts=2",
          "--set", "data.source.num_inference_steps=2", "--set", "data.source.rounds=1", "--set", "train.batch_size=2",
          "--set", "train.learning_rate=0.003", "--set", "export.enabled=false", "--set", "train.checkpoint_every=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def trainable(run_dir: Path, step: int) -> dict:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / "trainable.safetensors"))


def cli(*args):
    return [str(BIN / "genalign"), "train", *args]


def torchrun(*args):
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29517", "-m", "genalign.cli", "train", *args]


def test_two_process_run_with_resume_equals_single_process_accumulation(tmp_path):
    # 2 ranks x batch 2 (stopped after 2 steps, resumed to 4) vs 1 rank x batch 2 x accumulation 2.
    subprocess.run(torchrun("-o", str(tmp_path / "ddp"), *COMMON, "--set", "train.steps=2"), env=ENV, check=True,
                   capture_output=True)
    subprocess.run(torchrun("-o", str(tmp_path / "ddp"), *COMMON, "--set", "train.steps=4", "--resume", "latest"),
                   env=ENV, check=True, capture_output=True)
    subprocess.run(cli("-o", str(tmp_path / "one"), *COMMON, "--set", "train.steps=4",
                       "--set", "train.gradient_accumulation_steps=2"), env=ENV, check=True, capture_output=True)
    a, b = trainable(tmp_path / "ddp", 4), trainable(tmp_path / "one", 4)
    # Same rows, same noise per row, gradients averaged the same way: equal up to float reduction order.
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # training moved the LoRA weights
    # Validation is sharded over ranks with per-sample seeds: the same held-out reward as one process.
    ra = json.loads((tmp_path / "ddp" / "summary.json").read_text())["reward_after"]
    rb = json.loads((tmp_path / "one" / "summary.json").read_text())["reward_after"]
    assert ra.keys() == rb.keys() and all(abs(ra[k] - rb[k]) < 1e-5 for k in ra)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_at_step_boundary_and_resume_is_exact(tmp_path, sig):
    # SIGTERM (a scheduler's pre-emption) and SIGINT (Ctrl-C) both stop at the next step boundary with a checkpoint.
    steps = ["--set", "train.steps=40", "--set", "train.checkpoint_every=100", "--set", "train.log_every=1"]
    run = tmp_path / "sig"
    proc = subprocess.Popen(cli("-o", str(run), *COMMON, *steps), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    log = run / "logs" / "train.log"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and "step 3 " in log.read_text()):
        time.sleep(0.2)
    proc.send_signal(sig)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 128 + sig, out  # the shell convention: 130 (SIGINT) / 143 (SIGTERM)
    cks = list_checkpoints(run)
    assert len(cks) == 1 and 3 <= int(cks[0].name.split("_")[1]) < 40
    subprocess.run(cli("-o", str(run), *COMMON, *steps, "--resume", "latest"), env=ENV, check=True, capture_output=True)
    subprocess.run(cli("-o", str(tmp_path / "full"), *COMMON, *steps), env=ENV, check=True, capture_output=True)
    a, b = trainable(run, 40), trainable(tmp_path / "full", 40)
    for k in a:
        assert torch.equal(a[k], b[k]), k


ONLINE = {
    "di_star_digits.yaml": [],
    "r0_digits.yaml": [],
    "dragon_digits.yaml": ["--set", "objective.steps_per_round=1", "--set", "objective.win_rate_samples_per_prompt=4"],
    "ctrl_u_digits.yaml": [],
}


@pytest.mark.parametrize("recipe", sorted(ONLINE))
def test_online_objectives_run_under_two_processes(tmp_path, recipe):
    """DI*, R0, DRAGON and Ctrl-U: a few steps on 2 gloo ranks with a checkpoint, no hang, finite losses."""
    root = Path(__file__).resolve().parent.parent
    args = [str(root / "configs" / recipe), "-o", str(tmp_path / "run"), "--quiet", "--set", "train.steps=2",
            "--set", "train.batch_size=2", "--set", "train.checkpoint_every=1", "--set", "validation.max_prompts=2",
            "--set", "validation.samples_per_prompt=1", "--set", "validation.num_inference_steps=2",
            "--set", "export.enabled=false", "--set", "export.report=false", "--set", "train.log_every=1",
            *ONLINE[recipe]]
    proc = subprocess.run(torchrun(*args), env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and len(list_checkpoints(tmp_path / "run")) >= 1
    losses = [v for h in summary["history"] for k, v in h.items() if k.endswith("loss")]
    assert losses and all(v == v and abs(v) < 1e12 for v in losses)  # finite


def test_cpu_preset_launches_two_processes_and_the_log_says_so(tmp_path):
    # accelerate launch with configs/accelerate/cpu_2proc.yaml ran a single process before (distributed_type MULTI_CPU).
    preset = Path(__file__).resolve().parent.parent / "configs" / "accelerate" / "cpu_2proc.yaml"
    run = tmp_path / "acc"
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(preset), "--main_process_port", "29531",
           "-m", "genalign.cli", "train", "-o", str(run), *COMMON, "--set", "train.steps=1"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "distributed type MULTI_CPU, 2 process(es)" in (run / "logs" / "train.log").read_text()


def test_a_stalled_rank_ends_the_run_within_the_timeout(tmp_path):
    # SIGSTOP on rank 1: without a process-group timeout rank 0 waited forever in the next collective.
    run = tmp_path / "stall"
    steps = ["--set", "train.steps=200", "--set", "train.log_every=1", "--set", "train.ddp_timeout_s=20"]
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29533", "-m", "genalign.cli", "train",
           "-o", str(run), *COMMON, *steps]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    log = run / "logs" / "train.log"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and "step 2 " in log.read_text()):
        time.sleep(0.2)
    ranks = subprocess.run(["pgrep", "-f", f"genalign.cli train -o {run}"], capture_output=True, text=True).stdout.split()
    children = [int(p) for p in ranks if int(p) != proc.pid]
    assert len(children) >= 2, ranks
    os.kill(max(children), signal.SIGSTOP)  # the later-started worker: rank 1
    t0 = time.time()
    try:
        out = proc.communicate(timeout=240)[0].decode()
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode != 0
    assert time.time() - t0 < 200, "the stalled rank was waited for far longer than train.ddp_timeout_s"
    assert "timed out" in out.lower() or "timeout" in out.lower(), out[-3000:]
