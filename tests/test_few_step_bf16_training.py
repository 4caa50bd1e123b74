"""Issue 13 §2 through the trainer: the tiny variants of the few-step (R0 + LoRA, DI* full fine-tune) and ControlNet
(Ctrl-U) recipes under ``train.mixed_precision: bf16`` train, validate and export the model they trained."""

from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from genalign.config import LoraConfig, load_config
from genalign.pipelines.controlnet import ControlNetAdapter
from genalign.pipelines.few_step import build_few_step
from genalign.pipelines.lora import lora_delta, lora_layers
from genalign.pipelines.tiny import tiny_sd_pipeline
from genalign.training import checkpoint as ckpt
from genalign.training.trainer import train

ROOT = Path(__file__).resolve().parent.parent
BF16 = ["pipeline.model=tiny:sd", "train.mixed_precision=bf16", "train.steps=2", "train.batch_size=3",
        "validation.samples_per_prompt=1", "validation.max_prompts=2", "train.log_every=1"]
PROMPTS = ["a handwritten digit 3", "the number 7, written by hand"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state: a bf16 run after an fp32 run in the same pytest process (and the
    fp32 runs after these) need it reset (as accelerate's own tests do)."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _last(run):
    return ckpt.list_checkpoints(run)[-1]


def _gens():
    return [torch.Generator().manual_seed(s) for s in (1, 2)]


def test_r0_lora_bf16_run_exports_base_plus_fp32_delta(tmp_path):
    from diffusers import DiffusionPipeline

    cfg = load_config(ROOT / "configs" / "r0_digits.yaml", BF16 + [
        "pipeline.lora.rank=4", "pipeline.reference=adapter_off", "train.learning_rate=1e-3"])
    s = train(cfg, tmp_path / "r", progress=False)
    assert s["steps"] == 2
    # the trained model, rebuilt in fp32 from the checkpoint
    twin = build_few_step(tiny_sd_pipeline(), lora=LoraConfig(rank=4), reference="adapter_off")
    twin.configure_few_step(cfg.objective.num_steps, cfg.objective.first_timestep)
    ckpt.load_trainable(twin.denoiser(), _last(tmp_path / "r") / ckpt.trainable_file(0))
    deltas = {f"{n}.weight": lora_delta(layer) for n, layer in lora_layers(twin.denoiser())}
    assert sum(d.abs().sum() for d in deltas.values()) > 0
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "r" / "export")
    merged, ref = pipe.unet.state_dict(), tiny_sd_pipeline().unet.state_dict()
    num = sum(((merged[k] - ref[k]) - d).pow(2).sum() for k, d in deltas.items())
    den = sum(d.pow(2).sum() for d in deltas.values())
    assert (num / den).sqrt() < 0.01  # (merged − base) = LoRA delta within 1 % relative norm
    pipe.set_progress_bar_config(disable=True)
    K = cfg.objective.num_steps
    img = pipe(PROMPTS, num_inference_steps=K, guidance_scale=0.0, generator=_gens(), output_type="pt").images
    torch.testing.assert_close(img.float(), twin.sample(PROMPTS, generator=_gens()), atol=1e-4, rtol=1e-4)


def test_di_star_full_finetune_bf16_run_exports_the_trained_generator(tmp_path):
    from diffusers import DiffusionPipeline

    cfg = load_config(ROOT / "configs" / "di_star_digits.yaml", BF16)
    s = train(cfg, tmp_path / "r", progress=False)
    assert s["steps"] == 2 and "generator/div_loss" in s["history"][-1]
    gen = build_few_step(tiny_sd_pipeline(), lora=None, reference="frozen_copy")
    ckpt.load_trainable(gen.denoiser(), _last(tmp_path / "r") / ckpt.trainable_file(0))
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "r" / "export")
    for k, v in pipe.unet.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, gen.denoiser().state_dict()[k]), k
    base = tiny_sd_pipeline()
    for k, v in pipe.text_encoder.state_dict().items():
        assert torch.equal(v, base.text_encoder.state_dict()[k]), k


def test_ctrl_u_bf16_run_validates_and_exports_fp32(tmp_path):
    from diffusers import ControlNetModel, DiffusionPipeline

    cfg = load_config(ROOT / "configs" / "ctrl_u_digits.yaml", BF16 + [
        "train.batch_size=4", "data.source.max_images=8", "validation.num_inference_steps=2", "validation.every=1",
        "objective.t_max=999", "objective.lambda_ramp_steps=null"])
    s = train(cfg, tmp_path / "r", progress=False)
    assert s["steps"] == 2 and any("reward_loss" in h for h in s["history"])
    exp = tmp_path / "r" / "export"
    cn = ControlNetModel.from_pretrained(exp / "controlnet")
    m = ControlNetAdapter(tiny_sd_pipeline())
    m.set_controlnet("unet")
    ckpt.load_trainable(m.denoiser(), _last(tmp_path / "r") / ckpt.trainable_file(0))
    trained = m.denoiser().state_dict()
    for k, v in cn.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, trained[k]), k
    pipe = DiffusionPipeline.from_pretrained(exp)
    base = tiny_sd_pipeline()
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, base.unet.state_dict()[k]), k
