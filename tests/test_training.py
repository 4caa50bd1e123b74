"""The trainer end to end on tiny pipelines: learning, exact resume, export round trip, SDXL recipes."""

import json
from pathlib import Path

import pytest
import torch

from genalign.config import load_config
from genalign.training import checkpoint as ckpt
from genalign.training.trainer import train

ROOT = Path(__file__).resolve().parent.parent

FAST = [
    "pipeline.model=tiny:sd", "validation.samples_per_prompt=1", "validation.num_inference_steps=2",
    "validation.max_prompts=2", "data.source.num_inference_steps=2", "data.source.rounds=1",
    "train.batch_size=4", "train.log_every=1",
]


def run(tmp_path, name, extra, resume=None):
    cfg = load_config(None, FAST + extra)
    return train(cfg, tmp_path / name, resume=resume, progress=False)


def test_training_lowers_the_objective_on_a_fixed_batch(tmp_path):
    # One pair repeated: the batch is fixed, so the MaPO objective must go down.
    s = run(tmp_path, "fit", ["train.steps=30", "train.learning_rate=0.01", "train.batch_size=2",
                              "data.source.prompts=" + str(_one_prompt_file(tmp_path)), "data.source.samples_per_prompt=2",
                              "export.enabled=false"])
    losses = [h["loss"] for h in s["history"] if "loss" in h]
    # Fresh noise every step makes single values noisy: compare the first and last five steps.
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05


def _one_prompt_file(tmp_path):
    p = tmp_path / "one.txt"
    p.write_text("a handwritten digit 3\n")
    return p


def test_resume_gives_identical_parameters(tmp_path):
    base = ["train.steps=6", "train.checkpoint_every=3", "export.enabled=false", "train.learning_rate=0.003"]
    run(tmp_path, "full", base)
    # Interrupted run: 3 steps, then resume to 6 from the step-3 checkpoint.
    run(tmp_path, "part", ["train.steps=3", "train.checkpoint_every=3", "export.enabled=false",
                           "train.learning_rate=0.003"])
    run(tmp_path, "part", base, resume="latest")
    a = _trainable(tmp_path / "full")
    b = _trainable(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full_cfg = (tmp_path / "full" / "checkpoints" / "step_000006" / "config.yaml").read_text()
    assert "tiny:sd" in full_cfg


def _trainable(run_dir):
    from safetensors.torch import load_file

    return load_file(str(ckpt.list_checkpoints(run_dir)[-1] / "trainable.safetensors"))


def test_resume_latest_skips_half_written_checkpoint(tmp_path):
    run(tmp_path, "r", ["train.steps=2", "train.checkpoint_every=1", "export.enabled=false"])
    half = tmp_path / "r" / "checkpoints" / "step_000009"
    half.mkdir()
    (half / "trainable.safetensors").write_text("garbage")  # no COMPLETE marker
    assert ckpt.resolve_resume(tmp_path / "r", "latest").name == "step_000002"
    with pytest.raises(FileNotFoundError):
        ckpt.resolve_resume(tmp_path / "r", str(half))


def test_export_loads_in_vanilla_diffusers_and_matches(tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    from genalign.pipelines.tiny import tiny_sd_pipeline

    s = run(tmp_path, "e", ["train.steps=3", "train.learning_rate=0.05"])
    exp = tmp_path / "e" / "export"
    assert (exp / "pytorch_lora_weights.safetensors").exists() and "reward" in (exp / "README.md").read_text()
    assert set(s["reward_before"]) == {"digit_classifier"} and s["steps"] == 3 and s["seconds"] > 0
    merged = DiffusionPipeline.from_pretrained(exp)
    # The LoRA alone on the vanilla base gives the same images as the merged export.
    base = tiny_sd_pipeline()
    base.load_lora_weights(str(exp))
    # And both equal the trained in-memory model (re-built from the last checkpoint).
    from genalign.pipelines.sd import SDAdapter
    from genalign.config import LoraConfig

    mem = SDAdapter(tiny_sd_pipeline(), lora=LoraConfig(rank=8))
    ckpt.load_trainable(mem.unet, ckpt.list_checkpoints(tmp_path / "e")[-1] / "trainable.safetensors")
    kw = dict(num_inference_steps=3, guidance_scale=1.0, output_type="pt")
    imgs = [p(["a handwritten digit 5"], generator=torch.Generator().manual_seed(7), **kw).images
            for p in (merged, base, mem.pipe)]
    untrained = tiny_sd_pipeline()(["a handwritten digit 5"], generator=torch.Generator().manual_seed(7), **kw).images
    assert torch.allclose(imgs[0], imgs[1], atol=1e-4)
    assert torch.allclose(imgs[0], imgs[2], atol=1e-4)
    assert not torch.allclose(imgs[0], untrained, atol=1e-4)  # training changed the model
    assert isinstance(merged, StableDiffusionPipeline)


@pytest.mark.parametrize("recipe", ["mapo_sdxl.yaml", "dpo_sdxl.yaml"])
def test_sdxl_recipes_run_two_steps_on_tiny_sdxl(tmp_path, recipe):
    cfg = load_config(ROOT / "configs" / recipe, [
        "pipeline.model=tiny:sdxl", "pipeline.vae=null", "pipeline.resolution=8", "train.use_8bit_adam=false",
        "train.mixed_precision=no", "train.steps=2", "train.batch_size=2", "train.gradient_accumulation_steps=1",
        "data.source.source=" + str(_tiny_pairs(tmp_path)), "data.cache_latents=false", "export.enabled=false",
        "validation.prompts=digits:heldout", "validation.max_prompts=1", "validation.samples_per_prompt=1",
        "validation.num_inference_steps=2", "rewards=[{name: digit_classifier}]",
    ])
    assert cfg.pipeline.name == "sdxl"
    s = train(cfg, tmp_path / "xl", progress=False)
    assert s["steps"] == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in s["history"])


def _tiny_pairs(tmp_path):
    from PIL import Image

    d = tmp_path / "pairs"
    d.mkdir()
    rows = []
    for i in range(4):
        Image.new("RGB", (12, 10), (i * 40, 0, 0)).save(d / f"w{i}.png")
        Image.new("RGB", (12, 10), (0, i * 40, 0)).save(d / f"l{i}.png")
        rows.append({"prompt": f"a handwritten digit {i}", "chosen": f"w{i}.png", "rejected": f"l{i}.png"})
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "pairs.jsonl"
