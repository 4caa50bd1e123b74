"""Faults: NaN losses halt or skip, a failing reward is named, a failed export leaves nothing half-written."""

import errno

import pytest
import torch

from genalign.config import load_config
from genalign.objectives.mapo import MaPO
from genalign.registry import objectives, rewards
from genalign.rewards.base import Reward
from genalign.rewards.composite import RewardError
from genalign.training.trainer import NonFiniteLossError, train

FAST = ["pipeline.model=tiny:sd", "validation.samples_per_prompt=1", "validation.num_inference_steps=2",
        "validation.max_prompts=2", "data.source.num_inference_steps=2", "data.source.rounds=1",
        "train.batch_size=2", "train.log_every=1", "export.report=false"]


class NaNOnThirdCall(MaPO):
    """MaPO whose third loss is NaN (test objective)."""

    calls = 0

    def loss(self, batch, generator=None):
        out = super().loss(batch, generator)
        type(self).calls += 1
        if type(self).calls == 3:
            out.loss = out.loss * float("nan")
        return out


class Boom(Reward):
    """A reward model that crashes (test reward)."""

    def __init__(self, device=None):
        super().__init__()

    def forward(self, samples, prompts=None, **conditions):
        raise RuntimeError("CUDA error: device-side assert triggered")


@pytest.fixture(autouse=True)
def _register(monkeypatch):
    objectives.names(), rewards.names()  # load the built-ins before copying the tables
    monkeypatch.setattr(objectives, "_entries", dict(objectives._entries))
    monkeypatch.setattr(rewards, "_entries", dict(rewards._entries))
    objectives.add("nan_third", NaNOnThirdCall, "test")
    rewards.add("boom", Boom, "test")
    NaNOnThirdCall.calls = 0


def test_nan_loss_halts_naming_the_step(tmp_path):
    cfg = load_config(None, FAST + ["objective.name=nan_third", "train.steps=4", "export.enabled=false"])
    with pytest.raises(NonFiniteLossError, match=r"step 2 .*row ids \[\d+, \d+\]"):
        train(cfg, tmp_path / "r", progress=False)


def test_nan_loss_skip_leaves_parameters_unchanged_for_that_step(tmp_path):
    cfg = load_config(None, FAST + ["objective.name=nan_third", "train.steps=3", "train.on_nan=skip",
                                    "train.checkpoint_every=1", "export.enabled=false"])
    s = train(cfg, tmp_path / "r", progress=False)
    assert s["skipped_steps"] == 1 and s["steps"] == 3
    from safetensors.torch import load_file

    step2 = load_file(str(tmp_path / "r" / "checkpoints" / "step_000002" / "trainable.safetensors"))
    step3 = load_file(str(tmp_path / "r" / "checkpoints" / "step_000003" / "trainable.safetensors"))
    assert all(torch.equal(step2[k], step3[k]) for k in step2)  # the NaN step changed nothing
    assert all(torch.isfinite(v).all() for v in step3.values())


def test_failing_reward_is_named(tmp_path):
    cfg = load_config(None, FAST + ["train.steps=1", "rewards=[{name: digit_classifier}, {name: boom}]"])
    with pytest.raises(RewardError, match="reward 'boom' failed.*device-side assert"):
        train(cfg, tmp_path / "r", progress=False)


def test_failed_export_leaves_nothing_half_written(tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    from genalign.export import export_pipeline
    from genalign.pipelines.sd import SDAdapter
    from genalign.pipelines.tiny import tiny_sd_pipeline

    cfg = load_config(None, FAST)
    model = SDAdapter(tiny_sd_pipeline(), lora=cfg.pipeline.lora)
    out = tmp_path / "export"
    export_pipeline(model, cfg, out)  # a good export exists ...
    before = sorted(p.name for p in out.iterdir())

    def disk_full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space"):
        export_pipeline(model, cfg, out)  # ... and survives a failed re-export untouched
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary folder left behind
