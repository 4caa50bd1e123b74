"""Adapters on tiny real-architecture pipelines: pair plumbing, reference, targets, conditioning."""

import pytest
import torch

from genalign.config import LoraConfig
from genalign.objectives.mapo import mapo_loss
from genalign.pipelines.denoising import paired_denoising_losses, per_sample_error, reference_losses
from genalign.pipelines.sd import SDAdapter
from genalign.pipelines.sdxl import SDXLAdapter
from genalign.pipelines.tiny import tiny_clip_tokenizer, tiny_sd_pipeline, tiny_sdxl_pipeline


@pytest.fixture
def sd():
    return SDAdapter(tiny_sd_pipeline(), lora=LoraConfig(rank=4))


def test_tiny_tokenizer_roundtrips_offline(tmp_path):
    from transformers import CLIPTokenizer

    tok = tiny_clip_tokenizer()
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    for text in ["a handwritten digit 7", "A photo of a zebra, 4K!"]:
        assert again(text).input_ids == tok(text).input_ids
    assert len(tok("a handwritten digit 7").input_ids) == 6  # bos + 4 words + "7" + eos minus merges -> words are single tokens


def test_pairs_share_noise_timestep_and_conditioning(sd):
    seen = {}
    orig = sd.predict

    def spy(x_t, t, cond, unet=None):
        seen.update(x_t=x_t, t=t, cond=cond)
        return orig(x_t, t, cond, unet)

    sd.predict = spy
    lat = torch.randn(3, 4, 8, 8)
    cond = sd.encode_prompt(["a", "b", "c"])
    fwd = paired_denoising_losses(sd, lat, lat.clone(), cond, torch.Generator().manual_seed(0))
    assert torch.equal(seen["t"][:3], seen["t"][3:])
    assert torch.equal(seen["x_t"][:3], seen["x_t"][3:])  # same latents + same noise -> same x_t
    assert torch.equal(seen["cond"]["encoder_hidden_states"][:3], seen["cond"]["encoder_hidden_states"][3:])
    assert torch.allclose(fwd.losses_w, fwd.losses_l)


def test_end_to_end_step_matches_hand_computed_mapo(sd):
    lat_w, lat_l = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    cond = sd.encode_prompt(["a cat", "a dog"])
    fwd = paired_denoising_losses(sd, lat_w, lat_l, cond, torch.Generator().manual_seed(3))
    # Recompute by hand from the same draws.
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(lat_w.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    x_w = sd.noise_scheduler.add_noise(lat_w, noise, t)
    x_l = sd.noise_scheduler.add_noise(lat_l, noise, t)
    with torch.no_grad():
        pw = sd.unet(x_w, t, cond["encoder_hidden_states"]).sample
        pl = sd.unet(x_l, t, cond["encoder_hidden_states"]).sample
    lw = ((pw - noise) ** 2).mean(dim=(1, 2, 3))
    ll = ((pl - noise) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(fwd.losses_w, lw, atol=1e-5) and torch.allclose(fwd.losses_l, ll, atol=1e-5)
    assert mapo_loss(fwd.losses_w, fwd.losses_l)[0].item() == pytest.approx(mapo_loss(lw, ll)[0].item(), abs=1e-4)


def test_adapter_off_reference_equals_base_and_policy_at_init(sd):
    base = tiny_sd_pipeline().unet
    lat = torch.randn(2, 4, 8, 8)
    cond = sd.encode_prompt(["x", "y"])
    t = torch.tensor([10, 500])
    with torch.no_grad():
        want = base(lat, t, cond["encoder_hidden_states"]).sample
    with sd.reference() as ref:
        got = sd.predict(lat, t, cond, unet=ref)
    assert torch.allclose(got, want, atol=1e-6)
    # Gaussian LoRA init has B = 0: the policy equals the reference at step 0 ...
    with torch.no_grad():
        assert torch.allclose(sd.predict(lat, t, cond), want, atol=1e-6)
    # ... and after perturbing the LoRA weights the policy differs but the reference still equals the base.
    with torch.no_grad():
        for p in sd.trainable_parameters():
            p.add_(0.1)
        assert not torch.allclose(sd.predict(lat, t, cond), want, atol=1e-4)
    with sd.reference() as ref:
        assert torch.allclose(sd.predict(lat, t, cond, unet=ref), want, atol=1e-6)
    fwd = paired_denoising_losses(sd, lat, lat, cond, torch.Generator().manual_seed(0))
    rw, rl = reference_losses(sd, fwd)
    assert not rw.requires_grad


def test_only_lora_params_train_and_frozen_copy_option():
    sd = SDAdapter(tiny_sd_pipeline(), lora=LoraConfig(rank=2))
    names = [n for n, p in sd.unet.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    assert not any(p.requires_grad for p in sd.pipe.text_encoder.parameters())
    full = SDAdapter(tiny_sd_pipeline(), lora=None, reference="frozen_copy")
    assert all(p.requires_grad for p in full.unet.parameters())
    assert not any(p.requires_grad for p in full.ref_unet.parameters())
    with pytest.raises(ValueError, match="adapter_off"):
        SDAdapter(tiny_sd_pipeline(), lora=None, reference="adapter_off")


def test_v_prediction_target():
    sd = SDAdapter(tiny_sd_pipeline("v_prediction"), lora=LoraConfig(rank=2))
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([100, 900])
    a = sd.noise_scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sd.noise_scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(sd.target(x0, noise, t), a * noise - s * x0, atol=1e-6)


def test_sdxl_conditioning_has_pooled_and_time_ids():
    xl = SDXLAdapter(tiny_sdxl_pipeline(), lora=LoraConfig(rank=2))
    cond = xl.encode_prompt(["a cat", "a dog"])
    assert cond["encoder_hidden_states"].shape == (2, 16, 64)  # two encoders' penultimate states concatenated
    assert cond["text_embeds"].shape == (2, 32)
    assert cond["time_ids"].tolist()[0] == [8, 8, 0, 0, 8, 8]
    extra = xl.pair_extra_cond({"original_sizes": torch.tensor([[600, 800]]), "crop_top_lefts": torch.tensor([[0, 100]])})
    assert extra["time_ids"].tolist() == [[600, 800, 0, 100, 8, 8]]
    fwd = paired_denoising_losses(xl, torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), cond)
    assert fwd.losses_w.shape == (2,) and torch.isfinite(fwd.losses_w).all()


def test_per_sample_mse_upcasts_and_reduces():
    a = torch.ones(2, 3, dtype=torch.float16)
    b = torch.zeros(2, 3, dtype=torch.float16)
    assert per_sample_error(a, b).dtype == torch.float32
    assert per_sample_error(a, b, "sum").tolist() == [3.0, 3.0]


def test_reference_first_dpo_is_bitwise_the_policy_first_order():
    """Running the reference pass before the policy forward (lower peak memory) changes no bit of the Diffusion-DPO
    loss or its gradients compared with the policy-first order."""
    from genalign.objectives.dpo import diffusion_dpo_loss

    torch.manual_seed(0)
    sd = SDAdapter(tiny_sd_pipeline(), lora=LoraConfig(rank=4))
    with torch.no_grad():
        for p in sd.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))  # policy ≠ reference
    cond = sd.encode_prompt(["a cat", "a dog"])
    lw, ll = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)

    def grads_of(loss):
        sd.unet.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.clone() for p in sd.trainable_parameters()]

    first = paired_denoising_losses(sd, lw, ll, cond, torch.Generator().manual_seed(7), with_reference=True)
    loss_a, _ = diffusion_dpo_loss(first.losses_w, first.losses_l, first.ref_w, first.ref_l)
    grads_a = grads_of(loss_a)
    after = paired_denoising_losses(sd, lw, ll, cond, torch.Generator().manual_seed(7))
    rw, rl = reference_losses(sd, after)
    loss_b, _ = diffusion_dpo_loss(after.losses_w, after.losses_l, rw, rl)
    grads_b = grads_of(loss_b)
    assert torch.equal(loss_a, loss_b) and loss_a.item() != pytest.approx(0.6931, abs=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b)) and any(a.abs().sum() > 0 for a in grads_a)


@pytest.mark.parametrize("name", ["diffusion_dpo", "mapo"])
def test_equivalent_beta_in_the_other_reduction_is_logged_once(name, caplog):
    """Issue 14 item 15: DPO and MaPO log their scale in the other reduction convention, as DDO / DRAGON do."""
    import logging

    from genalign.registry import objectives

    sd = SDAdapter(tiny_sd_pipeline(), lora=LoraConfig(rank=2))
    cls = objectives.get(name)
    obj = cls(cls.Config(), sd)
    batch = {"latents_w": torch.randn(2, 4, 8, 8), "latents_l": torch.randn(2, 4, 8, 8),
             "cond": sd.encode_prompt(["a", "b"])}
    with caplog.at_level(logging.INFO):
        obj.loss(batch, torch.Generator().manual_seed(0))
        obj.loss(batch, torch.Generator().manual_seed(0))
    lines = [r.getMessage() for r in caplog.records if "D=256" in r.getMessage()]
    assert len(lines) == 1
    want = "beta=19.5312 with sum" if name == "diffusion_dpo" else "kappa=3.90625"
    assert want in lines[0], lines[0]
