"""The few_step adapter: one-step mapping, K-step random-η rollout, and the vanilla-Diffusers export round trip."""

import warnings

import pytest
import torch

from genalign.pipelines.few_step import build_few_step, few_step_scheduler, few_step_timesteps, x0_from_noise
from genalign.pipelines.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

PROMPTS = ["a handwritten digit 3", "the number 7, written by hand"]


def _gens(seeds=(1, 2)):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _model(kind="sd", K=1, t0=399, lora=None, prediction_type="epsilon"):
    pipe = tiny_sd_pipeline(prediction_type) if kind == "sd" else tiny_sdxl_pipeline(prediction_type)
    m = build_few_step(pipe, lora=lora, reference="frozen_copy" if lora is None else "adapter_off")
    m.configure_few_step(K, t0)
    return m


def test_timesteps_match_vanilla_ddim_and_reject_bad_schedules():
    assert few_step_timesteps(1, 399) == [399]
    assert few_step_timesteps(4, 999) == [999, 749, 499, 249]  # DMD2 4-step schedule
    assert few_step_timesteps(2, 399) == [399, 199]
    sched = few_step_scheduler(tiny_sd_pipeline().scheduler.config, 4, 999)
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999, 749, 499, 249]
    for bad in [(3, 399), (0, 399), (1, 1000)]:
        with pytest.raises(ValueError):
            few_step_timesteps(*bad)


def test_exported_scheduler_keeps_the_base_alphas():
    base = tiny_sd_pipeline().scheduler
    from diffusers import DDPMScheduler

    ac = DDPMScheduler.from_config(base.config).alphas_cumprod
    sched = few_step_scheduler(base.config, 1, 399)
    assert sched.config.num_train_timesteps == 400
    assert torch.equal(sched.alphas_cumprod, ac[:400])
    assert sched.final_alpha_cumprod.item() == 1.0  # the last step returns x̂0 exactly


def test_one_step_mapping_is_dmd2_x0_and_lcm_denoised():
    from diffusers import LCMScheduler

    m = _model()
    z = torch.randn(2, 4, 8, 8)
    cond = m.encode_prompt(PROMPTS)
    with torch.no_grad():
        x0 = m.generate_latents(z, cond)[-1]
        eps = m.unet(z, torch.full((2,), 399), cond["encoder_hidden_states"]).sample
    ac = m.alphas_cumprod
    torch.testing.assert_close(x0, x0_from_noise(z, eps, 399, ac), atol=1e-5, rtol=1e-5)
    lcm = LCMScheduler.from_config(m.pipe.scheduler.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lcm.set_timesteps(timesteps=[399])
    torch.testing.assert_close(x0, lcm.step(eps, 399, z).denoised, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_eps_is_consistent_with_the_forward_process(prediction_type):
    m = _model(prediction_type=prediction_type)
    x_t, pred = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([20, 399, 900])
    x0, eps = m.x0_eps(x_t, t, pred)
    ab = m.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, x_t, atol=1e-5, rtol=1e-5)
    if prediction_type == "v_prediction":  # v = a·ε − s·x0
        torch.testing.assert_close(ab.sqrt() * eps - (1 - ab).sqrt() * x0, pred, atol=1e-5, rtol=1e-5)


def test_eta_zero_step_equals_the_deterministic_ddim_step():
    from diffusers import DDIMScheduler

    m = _model(K=4, t0=999)
    z = torch.randn(2, 4, 8, 8)
    cond = m.encode_prompt(PROMPTS)
    with torch.no_grad():
        ours = m.generate_latents(z, cond, eta=0.0)
        # vanilla DDIM (η = 0) over the same timesteps, from the exported scheduler
        sched = few_step_scheduler(m.pipe.scheduler.config, 4, 999)
        assert isinstance(sched, DDIMScheduler)
        sched.set_timesteps(4)
        x = z
        for t in sched.timesteps:
            eps = m.unet(x, t, cond["encoder_hidden_states"]).sample
            x = sched.step(eps, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours[-1], x, atol=1e-5, rtol=1e-5)
    # η > 0 re-noises (a different, generator-dependent sample); rows are independent: a row with η = 0 in a
    # mixed batch equals the all-η = 0 rollout
    with torch.no_grad():
        mixed = m.generate_latents(z, cond, eta=torch.tensor([0.0, 1.0]), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mixed[-1][0], ours[-1][0], atol=1e-6, rtol=1e-6)
    assert (mixed[-1][1] - ours[-1][1]).abs().max() > 1e-3


def test_rollout_gradient_reaches_the_first_step_unless_truncated():
    m = _model(K=4, t0=999)
    cond = m.encode_prompt(PROMPTS)
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    m.generate_latents(z, cond, eta=0.5, generator=torch.Generator().manual_seed(0))[-1].sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    z2 = z.detach().clone().requires_grad_(True)
    out = m.generate_latents(z2, cond, eta=0.5, generator=torch.Generator().manual_seed(0), backprop_steps=1)
    out[-1].sum().backward()
    assert z2.grad is None  # the chain was cut before the last step


def _roundtrip(m, tmp_path, K):
    from diffusers import DiffusionPipeline

    m.write_export(tmp_path / "exp")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "exp")
    pipe.set_progress_bar_config(disable=True)
    exported = pipe(PROMPTS, num_inference_steps=K, guidance_scale=0.0, output_type="pt", generator=_gens()).images
    memory = m.sample(PROMPTS, generator=_gens())
    return pipe, exported, memory


@pytest.mark.parametrize("kind,K,t0", [("sd", 1, 399), ("sd", 4, 999), ("sdxl", 1, 399)])
def test_export_roundtrip_vanilla_diffusers_same_image(tmp_path, kind, K, t0):
    m = _model(kind, K, t0)
    with torch.no_grad():  # a "trained" generator: perturb the weights so it differs from the base
        for p in m.unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    pipe, exported, memory = _roundtrip(m, tmp_path, K)
    assert type(pipe).__name__ == ("StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline")
    assert pipe.scheduler.timesteps.tolist() == few_step_timesteps(K, t0)
    torch.testing.assert_close(exported, memory, atol=1e-5, rtol=1e-5)
    # not a trivial match: the untrained base gives another image, and so does another seed
    base = _model(kind, K, t0).sample(PROMPTS, generator=_gens())
    assert (base - memory).abs().max() > 1e-3
    assert (m.sample(PROMPTS, generator=_gens((3, 4))) - memory).abs().max() > 1e-3
    info = (tmp_path / "exp" / "few_step.json").read_text()
    assert f'"num_inference_steps": {K}' in info


def test_lora_generator_exports_merged(tmp_path):
    from genalign.config import LoraConfig

    m = _model("sd", 1, 399, lora=LoraConfig(rank=4))
    with torch.no_grad():
        for n, p in m.unet.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    pipe, exported, memory = _roundtrip(m, tmp_path, 1)
    assert not any("lora" in k for k in pipe.unet.state_dict())
    torch.testing.assert_close(exported, memory, atol=1e-5, rtol=1e-5)


def test_sample_is_per_row_seeded_and_batch_size_independent():
    m = _model("sd", 4, 999)
    a = m.sample(PROMPTS, generator=_gens(), batch_size=2)
    b = torch.cat([m.sample(PROMPTS[:1], generator=_gens((1,))), m.sample(PROMPTS[1:], generator=_gens((2,)))])
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert a.shape == (2, 3, 8, 8) and 0 <= a.min() and a.max() <= 1
