"""LoRA folds and merged exports under half-precision base weights (issue 13 §2): computed in fp32, cast once.

Checks: (merged − base) equals the LoRA delta within 1 % relative norm for a DDO round switch and for the Stable
Audio export, while the old in-place bf16 add loses far more; the exported pipeline reproduces the in-memory sample
within bf16 tolerance; repeated folds accumulate exactly.
"""

import pytest
import torch

from genalign.config import LoraConfig
from genalign.pipelines.lora import lora_delta, lora_layers, merge_lora_into_base, merged_base_state

BF16 = torch.bfloat16


def _small_lora(net, scale, seed=0):
    """Realistic LoRA: B of order `scale` so that ‖ΔW‖ is ~1 % of ‖W‖ (far below bf16's resolution per element)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def _rel(a, b):
    """‖a − b‖ / ‖b‖."""
    return float((a.detach() - b.detach()).norm() / b.detach().norm())


def _base_and_delta(net):
    base = {n: layer.get_base_layer().weight.detach().float().clone() for n, layer in lora_layers(net)}
    delta = {n: lora_delta(layer).detach() for n, layer in lora_layers(net)}
    return base, delta


def test_ddo_round_switch_under_bf16_keeps_the_lora_delta():
    from genalign.objectives.ddo import DDO
    from genalign.pipelines.sd import SDAdapter
    from genalign.pipelines.tiny import tiny_sd_pipeline

    sd = SDAdapter(tiny_sd_pipeline(), lora=LoraConfig(rank=4), weight_dtype=BF16)
    net = sd.denoiser()
    assert all(p.dtype == BF16 for n, p in net.named_parameters() if "lora" not in n)
    _small_lora(net, 2e-3)
    base, delta = _base_and_delta(net)
    assert max(float(delta[n].norm() / base[n].norm()) for n in base) < 0.05  # small, as after real training
    old = max(_rel((base[n].to(BF16) + delta[n].to(BF16)).float() - base[n], delta[n]) for n in base)
    assert old > 0.05  # the old in-place bf16 add: (merged − base) is > 5 % off the delta
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    cond = sd.encode_prompt(["a handwritten digit 1", "a handwritten digit 2"])
    with torch.no_grad():
        policy = sd.predict(x_t, t, cond).float()
    res = DDO(DDO.Config(), sd).switch_reference()
    assert res.reset_optimizer_state
    merged = {n: layer.get_base_layer().weight.detach().float() for n, layer in lora_layers(net)}
    assert max(_rel(merged[n] - base[n], delta[n]) for n in base) < 0.01  # fp32 fold: within 1 % (measured ~3e-6)
    with torch.no_grad():
        with sd.reference() as ref:
            reference = sd.predict(x_t, t, cond, unet=ref).float()
        after = sd.predict(x_t, t, cond)
    assert after.dtype == BF16  # the rest of the network still runs in bf16
    scale = policy.abs().max()
    assert (reference - policy).abs().max() <= 2e-2 * scale  # new reference = old policy, within bf16 rounding
    assert (after.float() - policy).abs().max() <= 2e-2 * scale  # LoRA reset: policy starts at its reference


def test_repeated_folds_accumulate_exactly_and_resume_refolds():
    from genalign.pipelines.sd import SDAdapter
    from genalign.pipelines.tiny import tiny_sd_pipeline

    sd = SDAdapter(tiny_sd_pipeline(), lora=LoraConfig(rank=4), weight_dtype=BF16)
    net = sd.denoiser()
    base, _ = _base_and_delta(net)
    total = {n: torch.zeros_like(w) for n, w in base.items()}
    snaps = []
    for r in range(3):
        _small_lora(net, 1e-3, seed=r + 1)
        snaps.append({n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad})
        for n, d in _base_and_delta(net)[1].items():
            total[n] += d
        assert sd.fold_lora(reset=True) > 0
    for n, layer in lora_layers(net):
        assert _rel(layer.get_base_layer().weight.detach().float() - base[n], total[n]) < 1e-4
    assert sd.lora_folded
    # resume: a fresh bf16 model re-folds the recorded snapshots to the same weights
    sd2 = SDAdapter(tiny_sd_pipeline(), lora=LoraConfig(rank=4), weight_dtype=BF16)
    for s in snaps:
        sd2.fold_lora(s, reset=False)
    for (n, a), (_, b) in zip(lora_layers(net), lora_layers(sd2.denoiser())):
        assert torch.allclose(a.get_base_layer().weight, b.get_base_layer().weight, atol=1e-6)


def test_merged_base_state_is_fp32_and_exact():
    from genalign.pipelines.sd import SDAdapter
    from genalign.pipelines.tiny import tiny_sd_pipeline

    sd = SDAdapter(tiny_sd_pipeline(), lora=LoraConfig(rank=4), weight_dtype=BF16)
    net = sd.denoiser()
    _small_lora(net, 2e-3)
    base, delta = _base_and_delta(net)
    state = merged_base_state(net)
    for n in base:
        w = state[n + ".weight"]
        assert w.dtype == torch.float32 and _rel(w - base[n], delta[n]) < 0.01
    assert not any("lora_" in k or ".base_layer." in k for k in state)
    assert merge_lora_into_base(torch.nn.Linear(2, 2)) == 0  # no LoRA: nothing happens


def test_stable_audio_export_under_bf16_keeps_the_delta_and_reproduces_the_sample(tmp_path):
    from diffusers import DiffusionPipeline

    from genalign.pipelines.audio import StableAudioAdapter, tiny_stable_audio_pipeline

    sa = StableAudioAdapter(tiny_stable_audio_pipeline(), lora=LoraConfig(rank=4, target_modules=["to_q", "to_k", "to_v",
                                                                                                  "to_out.0"]),
                            weight_dtype=BF16)
    net = sa.denoiser()
    _small_lora(net, 3e-3)
    base, delta = _base_and_delta(net)
    prompt, gens = ["a fast chord in A"], lambda: [torch.Generator().manual_seed(3)]  # noqa: E731
    in_memory = sa.sample_latents(prompt, 4, 1.0, gens())
    sa.write_export(tmp_path / "exp")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "exp")
    exported = pipe.transformer.state_dict()
    assert pipe.transformer.dtype == torch.float32  # cast once, to the export's fp32
    assert max(_rel(exported[n + ".weight"].float() - base[n], delta[n]) for n in base) < 0.01
    assert (tmp_path / "exp" / "genalign_lora.safetensors").exists()  # LoRA not folded: the LoRA file is valid
    loaded = StableAudioAdapter(pipe, lora=None, reference="none")
    got = loaded.sample_latents(prompt, 4, 1.0, gens())
    assert _rel(got, in_memory) < 2e-2  # the exported pipeline reproduces the in-memory bf16 sample


def test_audio_export_after_a_fold_has_no_stale_lora_file(tmp_path):
    from genalign.pipelines.audio import StableAudioAdapter, tiny_stable_audio_pipeline

    sa = StableAudioAdapter(tiny_stable_audio_pipeline(), lora=LoraConfig(rank=4, target_modules=["to_q", "to_k"]))
    _small_lora(sa.denoiser(), 0.05)
    sa.fold_lora(reset=True)
    sa.write_export(tmp_path / "exp")
    assert (tmp_path / "exp" / "model_index.json").exists()
    assert not (tmp_path / "exp" / "genalign_lora.safetensors").exists()  # base + this LoRA ≠ the model


@pytest.mark.parametrize("dtype", [torch.float16, BF16])
def test_fold_upcasts_only_folded_layers(dtype):
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).to(dtype)
    inject_adapter_in_model(PeftLoraConfig(r=2, target_modules=["0"], init_lora_weights="gaussian"), net)
    for p in net.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    _small_lora(net, 1e-2)
    x = torch.randn(3, 8, dtype=dtype)
    with torch.no_grad():
        before = net(x)
    merge_lora_into_base(net)
    assert net[0].get_base_layer().weight.dtype == torch.float32 and net[2].weight.dtype == dtype
    with torch.no_grad():
        after = net(x)
    assert after.dtype == dtype and torch.allclose(after.float(), before.float(), atol=2e-2)
