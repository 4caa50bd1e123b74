"""SD and SDXL LoRA exports under bf16 base weights (issue 13 §2): the fold happens in fp32 on a fresh fp32 base, so
(merged − base) equals the trained LoRA delta within 1 % relative norm, and the exported pipeline reproduces the
in-memory model's sample within bf16 tolerance."""

import pytest
import torch

from genalign.config import load_config
from genalign.export import export_pipeline
from genalign.pipelines.base import load_diffusers_pipeline
from genalign.pipelines.lora import lora_delta, lora_layers
from genalign.registry import pipelines


@pytest.mark.parametrize("model,name", [("tiny:sd", "sd"), ("tiny:sdxl", "sdxl")])
def test_lora_export_under_bf16_keeps_the_delta_and_the_sample(tmp_path, model, name):
    from diffusers import DiffusionPipeline

    cfg = load_config(None, [f"pipeline.model={model}", f"pipeline.name={name}", "pipeline.reference=none"])
    adapter = pipelines.get(name).from_config(cfg.pipeline, weight_dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a realistic trained LoRA: ‖ΔW‖ about 1 % of ‖W‖, far below bf16's per-element step
        for n, p in adapter.denoiser().named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.copy_(3e-3 * torch.randn(p.shape, generator=g))
    deltas = {n.replace(".base_layer", ""): lora_delta(layer).detach().float()
              for n, layer in lora_layers(adapter.denoiser())}
    out = export_pipeline(adapter, cfg, tmp_path / "export")
    merged = DiffusionPipeline.from_pretrained(str(out)).unet.state_dict()
    base = load_diffusers_pipeline(model).unet.state_dict()  # the fp32 base the export folded into
    errs = []
    for n, d in deltas.items():
        key = f"{n}.weight"
        errs.append(float(((merged[key].float() - base[key].float()) - d).norm() / d.norm()))
    assert deltas and max(errs) < 0.01, max(errs)
    # the exported fp32 pipeline samples what the bf16 in-memory model samples, within bf16 tolerance
    prompts = ["a handwritten seven"]
    x_mem = adapter.sample(prompts, num_inference_steps=3, guidance_scale=1.0,
                           generator=[torch.Generator().manual_seed(1)])
    pipe = DiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    x_exp = pipe(prompts, num_inference_steps=3, guidance_scale=1.0, generator=[torch.Generator().manual_seed(1)],
                 output_type="pt", height=adapter.resolution, width=adapter.resolution).images
    assert float((x_mem - x_exp.float()).abs().max()) < 0.05


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state: a bf16 run after fp32 runs in one pytest process needs it reset
    (as accelerate's own tests and tests/test_few_step_bf16_training.py do)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_mapo_lora_trains_and_evaluates_under_bf16(tmp_path, fresh_accelerate_state):
    # Held-out evaluation sampled bf16 latents into the fp32 VAE and crashed before training under bf16.
    from genalign.training.trainer import train

    cfg = load_config(None, ["pipeline.model=tiny:sd", "train.mixed_precision=bf16", "train.steps=2",
                             "train.batch_size=2", "validation.samples_per_prompt=1", "validation.max_prompts=2",
                             "validation.num_inference_steps=2", "data.source.num_inference_steps=2",
                             "data.source.rounds=1", "data.source.samples_per_prompt=2", "export.report=false"])
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["status"] == "ok" and summary["steps"] == 2
    assert (tmp_path / "run" / "export" / "model_index.json").exists()
