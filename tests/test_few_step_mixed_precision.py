"""Issue 13 §2 for the few-step and ControlNet exports: base weights held in bf16 during training never absorb a
LoRA delta or get saved as half-precision copies — the fold is fp32 on a fresh fp32 base load."""

import torch

from genalign.config import load_config
from genalign.pipelines.controlnet import ControlNetAdapter
from genalign.pipelines.few_step import build_few_step
from genalign.pipelines.lora import load_trainable_snapshot, lora_delta, lora_layers, trainable_snapshot
from genalign.pipelines.tiny import tiny_sd_pipeline

PROMPTS = ["a handwritten digit 3", "the number 7, written by hand"]


def _gens(seeds=(1, 2)):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _cfg(name, *extra):
    src = "data.source.kind=images" if name == "controlnet" else "data.source.kind=prompts"
    obj = "objective.name=ctrl_u" if name == "controlnet" else "objective.name=r0"
    return load_config(None, [f"pipeline.name={name}", "pipeline.model=tiny:sd", obj, src, *extra])


def _realistic_lora(unet, rel=2e-3, seed=0):
    """LoRA B weights such that each ΔW is ~rel of its base weight's scale (a typical fine-tune, far below bf16's
    resolution of 2^-8 ≈ 4e-3 relative)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(unet):
            base = layer.get_base_layer().weight.float()
            for name in layer.lora_B:
                layer.lora_B[name].weight.normal_(generator=g)
            d = lora_delta(layer)
            for name in layer.lora_B:  # rescale B so ‖ΔW‖ = rel·‖W‖
                layer.lora_B[name].weight.mul_(rel * base.norm() / d.norm().clamp_min(1e-12))


def test_few_step_lora_export_merges_in_fp32_on_bf16_base(tmp_path):
    from diffusers import DiffusionPipeline

    from genalign.config import LoraConfig

    cfg = _cfg("few_step", "pipeline.lora.rank=4", "objective.num_steps=1", "objective.first_timestep=399")
    m = build_few_step(tiny_sd_pipeline(), lora=LoraConfig(rank=4), reference="adapter_off",
                       weight_dtype=torch.bfloat16)
    m.configure_few_step(1, 399)
    unet = m.denoiser()
    assert next(p for n, p in unet.named_parameters() if "base_layer" in n).dtype == torch.bfloat16
    _realistic_lora(unet)
    deltas = {f"{n}.weight": lora_delta(layer) for n, layer in lora_layers(unet)}
    m.write_export(tmp_path / "exp", cfg)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "exp")
    base = tiny_sd_pipeline()
    merged, ref = pipe.unet.state_dict(), base.unet.state_dict()
    assert all(v.dtype == torch.float32 for v in merged.values())
    num = den = 0.0
    for k, d in deltas.items():
        num += ((merged[k] - ref[k]) - d).pow(2).sum().item()
        den += d.pow(2).sum().item()
    assert den > 0 and (num / den) ** 0.5 < 0.01  # (merged − base) = LoRA delta within 1 % relative norm
    for k, v in merged.items():  # every other weight is the fp32 original, not a bf16-rounded copy
        if k not in deltas:
            assert torch.equal(v, ref[k]), k
    for k, v in pipe.text_encoder.state_dict().items():
        assert torch.equal(v, base.text_encoder.state_dict()[k]), k
    # the exported pipeline reproduces the in-memory model: exactly the fp32 twin (same LoRA on the fp32 base), and
    # the bf16-base model within bf16 tolerance (no further than the bf16 model is from its own fp32 twin)
    twin = build_few_step(tiny_sd_pipeline(), lora=LoraConfig(rank=4), reference="adapter_off")
    twin.configure_few_step(1, 399)
    load_trainable_snapshot(twin.denoiser(), trainable_snapshot(unet))
    ours, ours32 = m.sample(PROMPTS, generator=_gens()), twin.sample(PROMPTS, generator=_gens())
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS, num_inference_steps=1, guidance_scale=0.0, generator=_gens(), output_type="pt",
                  height=m.resolution, width=m.resolution).images.float()
    torch.testing.assert_close(theirs, ours32, atol=1e-4, rtol=1e-4)
    bf16_noise = (ours - ours32).abs().mean()
    assert 0 < (ours - theirs).abs().mean() <= 1.01 * bf16_noise and bf16_noise < 0.05


def test_few_step_bf16_merge_would_lose_the_delta():
    # Control: the same delta added in bf16 (what an in-place half-precision fold does) is mostly rounded away.
    from genalign.config import LoraConfig

    m = build_few_step(tiny_sd_pipeline(), lora=LoraConfig(rank=4), reference="adapter_off",
                       weight_dtype=torch.bfloat16)
    unet = m.denoiser()
    _realistic_lora(unet)
    name, layer = next(iter(lora_layers(unet)))
    w = tiny_sd_pipeline().unet.get_submodule(name).weight.float()
    d = lora_delta(layer)
    lossy = (w.bfloat16() + d.bfloat16()).float() - w
    assert ((lossy - d).norm() / d.norm()).item() > 0.1


def test_controlnet_export_saves_fp32_originals_and_the_trained_controlnet(tmp_path):
    from diffusers import ControlNetModel, DiffusionPipeline

    cfg = _cfg("controlnet", "pipeline.lora=null")
    m = ControlNetAdapter(tiny_sd_pipeline(), weight_dtype=torch.bfloat16)
    assert m.unet.dtype == torch.bfloat16 and m.denoiser().dtype == torch.float32
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.denoiser().parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    m.write_export(tmp_path / "exp", cfg)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "exp")
    base = tiny_sd_pipeline()
    for name in ("unet", "text_encoder", "vae"):  # the fp32 originals, not the bf16 training copies
        ref = getattr(base, name).state_dict()
        for k, v in getattr(pipe, name).state_dict().items():
            assert v.dtype == torch.float32 and torch.equal(v, ref[k]), (name, k)
    cn = ControlNetModel.from_pretrained(tmp_path / "exp" / "controlnet")
    for k, v in cn.state_dict().items():
        assert torch.equal(v, m.denoiser().state_dict()[k]), k
    c = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(num_inference_steps=3, guidance_scale=1.0)
    ours = m.sample(PROMPTS, c, generator=_gens(), **kw)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS, image=c, generator=_gens(), output_type="pt", height=8, width=8, **kw).images.float()
    assert (ours - theirs).abs().max() < 0.05 and (ours - theirs).abs().mean() < 0.01


def test_few_step_full_finetune_export_under_bf16(tmp_path):
    # DI* trains the whole generator (fp32) beside bf16 frozen parts: sampling must run (it crashed on mixed
    # dtypes) and the export holds the trained fp32 UNet and the fp32 original text encoder / VAE.
    from diffusers import DiffusionPipeline

    cfg = _cfg("few_step", "pipeline.lora=null", "pipeline.reference=frozen_copy", "objective.name=di_star",
               "objective.init_timestep=399")
    m = build_few_step(tiny_sd_pipeline(), lora=None, reference="frozen_copy", weight_dtype=torch.bfloat16)
    m.configure_few_step(1, 399)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.denoiser().parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g))
    assert m.denoiser().dtype == torch.float32 and m.pipe.text_encoder.dtype == torch.bfloat16
    ours = m.sample(PROMPTS, generator=_gens())
    m.write_export(tmp_path / "exp", cfg)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "exp")
    trained = m.denoiser().state_dict()
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, trained[k]), k
    base = tiny_sd_pipeline()
    for k, v in pipe.text_encoder.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, base.text_encoder.state_dict()[k]), k
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS, num_inference_steps=1, guidance_scale=0.0, generator=_gens(), output_type="pt",
                  height=m.resolution, width=m.resolution).images.float()
    assert (ours - theirs).abs().mean() < 0.05
