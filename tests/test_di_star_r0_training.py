"""DI* and R0 as trainer objectives on tiny pipelines: phases, gradient routing, wiring, resume, export."""

import copy
from pathlib import Path

import pytest
import torch

from genalign.config import load_config
from genalign.objectives.di_star import DiffInstructStar, di_star_generator_loss, frozen_parameters
from genalign.objectives.r0 import R0
from genalign.pipelines.lora import lora_layers
from genalign.pipelines.few_step import build_few_step
from genalign.pipelines.tiny import tiny_sd_pipeline
from genalign.training import checkpoint as ckpt
from genalign.training.trainer import build_rewards, train

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a handwritten digit 3", "the number 7, written by hand", "a handwritten digit 1"]
FAST = ["pipeline.model=tiny:sd", "validation.samples_per_prompt=1", "validation.max_prompts=2",
        "train.batch_size=3", "train.log_every=1"]


def _rewards():
    from genalign.config import RewardItem

    return build_rewards([RewardItem(name="digit_classifier")], "cpu")


def _batch(model, prompts=PROMPTS):
    return {"prompts": list(prompts), "cond": model.encode_prompt(prompts), "ids": list(range(len(prompts)))}


def _di_star(**kw):
    model = build_few_step(tiny_sd_pipeline(), lora=None, reference="frozen_copy")
    obj = DiffInstructStar(DiffInstructStar.Config(**kw), model)
    obj.rewards = _rewards()
    return obj


def _grads(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


# ------------------------------------------------------------------ DI*


def test_di_star_phases_update_only_their_own_parameters():
    obj = _di_star(alpha=1.0, guidance_scale=2.0)
    gen_p = obj.model.trainable_parameters()
    fake_p = [p for p in obj.fake.parameters()]
    teacher = obj.model.ref_unet
    phases = obj.phases()
    assert [ph.name for ph in phases] == ["fake", "generator"]
    assert {id(p) for p in phases[0].params} == {id(p) for p in fake_p}
    assert {id(p) for p in phases[1].params} == {id(p) for p in gen_p}
    batch = _batch(obj.model)

    # (a) fake phase: gradient on ψ only (generator samples detached)
    out = phases[0].loss(batch, torch.Generator().manual_seed(0))
    out.loss.backward()
    assert all(p.grad is None for p in gen_p) and all(p.grad is None for p in teacher.parameters())
    assert sum(p.grad.abs().sum() for p in fake_p if p.grad is not None) > 0
    for p in fake_p:
        p.grad = None

    # (b) generator phase: gradient on θ only; ψ frozen during the forward but requires_grad restored after
    out = phases[1].loss(batch, torch.Generator().manual_seed(1))
    assert all(p.requires_grad for p in fake_p)
    out.loss.backward()
    assert all(p.grad is None for p in fake_p)
    assert all(p.grad is None for p in teacher.parameters())
    assert sum(p.grad.abs().sum() for p in gen_p if p.grad is not None) > 0
    assert {"div_loss", "reward", "reward/digit_classifier", "u_norm"} <= set(out.metrics)


def test_di_star_divergence_gradient_vanishes_when_fake_equals_teacher():
    # Card test 2 on the real UNets: at init ψ = teacher; with ω = 1 and α = 0, y ≡ 0 ⇒ L_div and ∇θ are exactly 0.
    obj = _di_star(alpha=0.0, guidance_scale=1.0)
    gen_p = obj.model.trainable_parameters()
    out = obj.generator_loss(_batch(obj.model), torch.Generator().manual_seed(0))
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.metrics["u_norm"] == 0.0
    assert all(p.grad is None or torch.all(p.grad == 0) for p in gen_p)
    # ...while CFG (ω = 2) makes ε^ω ≠ ε_ψ and gives a non-zero generator gradient
    obj.config = obj.Config(alpha=0.0, guidance_scale=2.0)
    for p in gen_p:
        p.grad = None
    obj.generator_loss(_batch(obj.model), torch.Generator().manual_seed(0)).loss.backward()
    assert sum(p.grad.abs().sum() for p in gen_p if p.grad is not None) > 0


def test_di_star_generator_phase_is_the_card_loss_with_cfg_teacher():
    # Wiring: the phase's loss and generator gradient equal the pure function called by hand on the same z, ε, t,
    # with the CFG teacher (∅ = empty prompt) and the fake network — and the sign-flipped loss gives the opposite
    # gradient (the sign test of the card is the analytic one in tests/objectives/test_di_star.py).
    from genalign.objectives.di_star import sample_timesteps

    obj = _di_star(alpha=3.0, guidance_scale=2.0)
    with torch.no_grad():  # make ψ differ from the teacher so the divergence is non-trivial
        for p in obj.fake.parameters():
            p.add_(0.01 * torch.randn_like(p))
    m, batch = obj.model, _batch(obj.model)
    gen_p = m.trainable_parameters()
    out = obj.generator_loss(batch, torch.Generator().manual_seed(5))
    out.loss.backward()
    g_phase = _grads(gen_p)
    for p in gen_p:
        p.grad = None

    g = torch.Generator().manual_seed(5)
    B = len(PROMPTS)
    z = torch.randn(B, 4, 8, 8, generator=g)
    x0 = m.generate_latents(z, batch["cond"], num_steps=1)[-1]
    noise = torch.randn(x0.shape, generator=g)
    t = sample_timesteps(B, 20, 980, generator=g)
    cond, unc = batch["cond"], m.encode_uncond(B)
    reward = obj.rewards(m.decode(x0), PROMPTS)
    with frozen_parameters(obj.fake.parameters()):
        loss, _ = di_star_generator_loss(
            x0, noise, t, m.alphas_cumprod, lambda x, tt: m.predict(x, tt, cond, unet=obj.fake),
            lambda x, tt: (m.predict(x, tt, unc, unet=m.ref_unet), m.predict(x, tt, cond, unet=m.ref_unet)),
            reward, alpha=3.0, guidance_scale=2.0)
    assert loss.item() == pytest.approx(out.loss.item(), rel=1e-5, abs=1e-6)
    loss.backward()
    g_hand = _grads(gen_p)
    for a, b in zip(g_phase, g_hand):
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    flat_a = torch.cat([a.flatten() for a in g_phase if a is not None])
    assert flat_a.abs().sum() > 0


def test_di_star_alpha_zero_is_pure_score_distillation():
    obj = _di_star(alpha=0.0, guidance_scale=2.0)

    class Boom(torch.nn.Module):
        differentiable = True

        def forward(self, *a, **k):
            raise AssertionError("α = 0 must not evaluate the reward")

    obj.rewards = Boom()
    out = obj.generator_loss(_batch(obj.model), torch.Generator().manual_seed(0))
    assert out.metrics["reward"] == 0.0
    assert out.loss.item() == pytest.approx(out.metrics["div_loss"] + out.metrics["cfg_loss"], abs=1e-6)
    # α > 0 adds exactly −α·mean r to the same divergence (same seed ⇒ same samples)
    obj2 = _di_star(alpha=2.0, guidance_scale=2.0)
    out2 = obj2.generator_loss(_batch(obj2.model), torch.Generator().manual_seed(0))
    assert out2.metrics["div_loss"] == pytest.approx(out.metrics["div_loss"], rel=1e-5)
    assert out2.loss.item() == pytest.approx(out.loss.item() - 2.0 * out2.metrics["reward"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("change", [dict(surrogate="exact"), dict(distance="l2"), dict(cfg_placement="out"),
                                    dict(cfg_convention="omega_minus_one"), dict(huber_c=5.0), dict(t_min=900)])
def test_di_star_reconstruction_options_change_the_loss(change):
    def loss(**kw):
        obj = _di_star(alpha=0.0, guidance_scale=2.0, **kw)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in obj.fake.parameters():
                p.add_(0.01 * torch.randn_like(p))
        return obj.generator_loss(_batch(obj.model), torch.Generator().manual_seed(0)).loss.item()

    assert loss(**change) != pytest.approx(loss(), rel=1e-4)


def test_di_star_config_errors():
    with pytest.raises(Exception):
        DiffInstructStar.Config(fake_steps_per_generator_step=2)
    with pytest.raises(Exception):
        DiffInstructStar.Config(t_min=500, t_max=100)
    with pytest.raises(ValueError, match="few_step"):
        from genalign.pipelines.sd import SDAdapter

        DiffInstructStar(DiffInstructStar.Config(), SDAdapter(tiny_sd_pipeline(), lora=None, reference="frozen_copy"))


def test_di_star_lora_teacher_is_adapter_off_and_fake_is_base():
    from genalign.config import LoraConfig

    model = build_few_step(tiny_sd_pipeline(), lora=LoraConfig(rank=4))
    obj = DiffInstructStar(DiffInstructStar.Config(alpha=0.0, guidance_scale=1.0), model)
    with torch.no_grad():
        for n, p in model.unet.named_parameters():
            if "lora_B" in n:
                p.add_(0.1 * torch.randn_like(p))
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([100, 700]), model.encode_prompt(PROMPTS[:2])
    with obj.model.reference_with_grad() as teacher, torch.no_grad():
        t_out = model.predict(x, t, cond, unet=teacher)
    base = tiny_sd_pipeline().unet
    with torch.no_grad():
        torch.testing.assert_close(t_out, base(x, t, cond["encoder_hidden_states"]).sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.predict(x, t, cond, unet=obj.fake), t_out, atol=1e-5, rtol=1e-5)
        assert (model.predict(x, t, cond) - t_out).abs().max() > 1e-4  # the generator (LoRA on) differs


# ------------------------------------------------------------------ R0


def _r0(lora=None, **kw):
    model = build_few_step(tiny_sd_pipeline(), lora=lora, reference="frozen_copy" if lora is None else "adapter_off")
    obj = R0(R0.Config(**kw), model)
    obj.rewards = _rewards()
    return obj


def test_r0_gradient_reaches_generator_and_regulariser_anchors_to_theta0():
    obj = _r0(weight_reg=0.5)
    params = obj.model.trainable_parameters()
    out = obj.loss(_batch(obj.model), torch.Generator().manual_seed(0))
    assert out.metrics["weight_reg"] == 0.0  # θ = θ0 at init
    out.loss.backward()
    assert sum(p.grad.abs().sum() for p in params if p.grad is not None) > 0
    with torch.no_grad():
        for p in params:
            p.add_(0.01)
    reg = obj.regularizer()
    expected = 0.5 * sum(((p - p0) ** 2).sum() for p, p0 in zip(params, obj.theta0))
    assert reg.item() == pytest.approx(expected.item(), rel=1e-5)


def test_r0_lora_regulariser_is_the_merged_delta():
    from genalign.config import LoraConfig

    obj = _r0(lora=LoraConfig(rank=4, alpha=8), weight_reg=2.0)
    unet = obj.model.unet
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.add_(0.1 * torch.randn_like(p))
    pairs = list(lora_layers(unet))
    assert len(pairs) > 0 and all(layer.scaling["default"] == 2.0 for _, layer in pairs)
    base = {n: p.detach().clone() for n, p in tiny_sd_pipeline().unet.named_parameters()}
    merged = copy.deepcopy(unet)
    merged.fuse_lora()
    merged.unload_lora()
    delta = sum(((p - base[n]) ** 2).sum() for n, p in merged.named_parameters())
    assert obj.regularizer().item() == pytest.approx(2.0 * delta.item(), rel=1e-4)


def test_r0_rewards_only_the_final_step_unless_uniform():
    calls = []
    obj = _r0(num_steps=4)
    real = obj.rewards.components

    def spy(images, prompts):
        calls.append(images.shape[0])
        return real(images, prompts)

    obj.rewards.components = spy
    obj.loss(_batch(obj.model), torch.Generator().manual_seed(0))
    assert len(calls) == 1
    calls.clear()
    obj.config = R0.Config(num_steps=4, step_weights="uniform")
    out = obj.loss(_batch(obj.model), torch.Generator().manual_seed(0))
    assert len(calls) == 4 and {f"reward_step{k}" for k in range(4)} <= set(out.metrics)


def test_r0_uses_the_run_reward_weights_and_rejects_all_zero():
    obj = _r0()
    assert obj.reward_weights() == {"digit_classifier": 1.0}
    obj.config = R0.Config(reward_weights={"digit_classifier": 0.0})
    with pytest.raises(ValueError, match="all reward weights are 0"):
        obj.loss(_batch(obj.model), torch.Generator().manual_seed(0))
    with pytest.raises(Exception):
        R0.Config(eta_range=(0.5, 0.2))
    with pytest.raises(ValueError, match="divisible"):
        _r0(num_steps=3)  # validated when the adapter is configured: (999 + 1) % 3 != 0


# ------------------------------------------------------------------ end to end (trainer)


def _trainable(run_dir, i=0):
    from safetensors.torch import load_file

    return load_file(str(ckpt.list_checkpoints(run_dir)[-1] / ckpt.trainable_file(i)))


@pytest.mark.parametrize("recipe,files", [("di_star_digits.yaml", 2), ("r0_digits.yaml", 1)])
def test_digits_recipes_resume_identical_and_export(tmp_path, recipe, files):
    base = FAST + ["train.steps=2", "train.checkpoint_every=1", "export.enabled=false"]
    cfg = load_config(ROOT / "configs" / recipe, base)
    train(cfg, tmp_path / "full", progress=False)
    part = load_config(ROOT / "configs" / recipe, FAST + ["train.steps=1", "train.checkpoint_every=1",
                                                          "export.enabled=false"])
    train(part, tmp_path / "part", progress=False)
    train(cfg, tmp_path / "part", resume="latest", progress=False)
    for i in range(files):
        a, b = _trainable(tmp_path / "full", i), _trainable(tmp_path / "part", i)
        assert a.keys() == b.keys() and len(a) > 0
        for k in a:
            assert torch.equal(a[k], b[k]), (i, k)


def test_di_star_training_changes_generator_and_exports_a_one_step_pipeline(tmp_path):
    from diffusers import DiffusionPipeline

    cfg = load_config(ROOT / "configs" / "di_star_digits.yaml", FAST + ["train.steps=2"])
    s = train(cfg, tmp_path / "r", progress=False)
    assert s["steps"] == 2 and "generator/div_loss" in s["history"][-1] and "fake/fake_loss" in s["history"][-1]
    exp = tmp_path / "r" / "export"
    pipe = DiffusionPipeline.from_pretrained(exp)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.num_train_timesteps == 400
    card = (exp / "README.md").read_text()
    assert "num_inference_steps=1" in card and "| alpha | 1.0 | [card] verified" in card and "[unknown → rec.]" in card
    img = pipe(["a handwritten digit 3"], num_inference_steps=1, guidance_scale=0.0, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    # the in-memory trained generator gives the same image
    model = build_few_step(tiny_sd_pipeline(), lora=None, reference="frozen_copy")
    ckpt.load_trainable(model.unet, ckpt.list_checkpoints(tmp_path / "r")[-1] / "trainable.safetensors")
    model.configure_few_step(1, 399)
    mem = model.sample(["a handwritten digit 3"], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(img, mem, atol=1e-5, rtol=1e-5)
    untrained = build_few_step(tiny_sd_pipeline(), lora=None, reference="frozen_copy")
    untrained.configure_few_step(1, 399)
    assert (untrained.sample(["a handwritten digit 3"], generator=torch.Generator().manual_seed(0)) - mem).abs().max() > 0
    # both phases stepped: the fake network (trainable_1) moved away from the teacher (= the base UNet)
    fake = _trainable(tmp_path / "r", 1)
    base = dict(tiny_sd_pipeline().unet.named_parameters())
    assert any(not torch.equal(v, base[k].detach()) for k, v in fake.items())


@pytest.mark.parametrize("recipe", ["di_star_sdxl.yaml", "r0_sd.yaml"])
def test_full_scale_recipes_validate_and_run_one_step_on_tiny(tmp_path, recipe):
    over = ["pipeline.vae=null", "pipeline.resolution=8", "train.use_8bit_adam=false", "train.mixed_precision=no",
            "train.steps=1", "train.batch_size=2", "train.gradient_accumulation_steps=1", "export.enabled=false",
            "validation.prompts=digits:heldout", "validation.max_prompts=1", "validation.samples_per_prompt=1",
            "rewards=[{name: digit_classifier}]", "data.source.prompts=digits:train"]
    if "di_star" in recipe:
        over.append("objective.generator_init=null")  # the DMD2 weights are not shipped
    tiny = "tiny:sdxl" if "sdxl" in recipe else "tiny:sd"
    cfg = load_config(ROOT / "configs" / recipe, over + [f"pipeline.model={tiny}"])
    assert cfg.pipeline.name == "few_step"
    s = train(cfg, tmp_path / "x", progress=False)
    assert s["steps"] == 1 and all(torch.isfinite(torch.tensor(v)) for k, v in s["history"][-1].items()
                                   if isinstance(v, float))
