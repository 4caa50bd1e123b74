"""The ControlNet pipeline adapter on tiny SD / SDXL: only the ControlNet trains, conditions pass through the
conditioning dict, init from the UNet or a checkpoint, export loads in vanilla Diffusers and reproduces outputs."""

import pytest
import torch

from genalign.pipelines.controlnet import (
    ControlNetAdapter,
    conditioning_channels_for,
    controlnet_from_unet,
    tiny_controlnet_pipeline,
)
from genalign.pipelines.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline


def _perturb(module, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _cond(model, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = model.encode_prompt(["a handwritten digit 3", "a handwritten digit 7"][:b])
    cond["controlnet_cond"] = torch.rand(b, 3, 8, 8, generator=g)
    return cond, torch.randn(b, 4, 8, 8, generator=g), torch.tensor([10, 700][:b])


@pytest.fixture(scope="module")
def sd_model():
    return ControlNetAdapter(tiny_sd_pipeline())


def test_conditioning_channels_match_the_vae_factor():
    assert conditioning_channels_for(8) == (16, 32, 96, 256)  # Diffusers' SD default
    assert conditioning_channels_for(1) == (16,)
    with pytest.raises(ValueError):
        conditioning_channels_for(3)
    # the condition embedding lands on the latent grid for the one-block tiny VAE (8x8 pixels → 8x8 latents)
    cn = controlnet_from_unet(tiny_sd_pipeline().unet, vae_scale_factor=1)
    emb = cn.controlnet_cond_embedding(torch.rand(1, 3, 8, 8))
    assert emb.shape[-2:] == (8, 8)


def test_init_from_unet_reproduces_the_base_and_only_controlnet_is_trainable(sd_model):
    m = sd_model
    cond, x, t = _cond(m)
    with torch.no_grad():
        base = m.unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
        pred = m.predict(x, t, cond)
    assert torch.equal(pred, base)  # zero convolutions: residuals are exactly 0 at init
    cn_ids = {id(p) for p in m.controlnet.parameters()}
    assert {id(p) for p in m.trainable_parameters()} == cn_ids
    for mod in (m.unet, m.vae, m.pipe.text_encoder):
        assert not any(p.requires_grad for p in mod.parameters())
    # encoder copied from the UNet
    assert torch.equal(m.controlnet.conv_in.weight, m.unet.conv_in.weight)


def test_optimizer_step_changes_only_controlnet_and_condition_matters():
    m = ControlNetAdapter(tiny_sd_pipeline())
    frozen = {n: {k: v.clone() for k, v in mod.state_dict().items()}
              for n, mod in (("unet", m.unet), ("vae", m.vae), ("te", m.pipe.text_encoder))}
    cn_before = {k: v.clone() for k, v in m.controlnet.state_dict().items()}
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-2)
    cond, x, t = _cond(m)
    for _ in range(3):
        loss = (m.predict(x, t, cond) - torch.randn_like(x)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in m.unet.parameters())
        opt.step()
    for n, mod in (("unet", m.unet), ("vae", m.vae), ("te", m.pipe.text_encoder)):
        for k, v in mod.state_dict().items():
            assert torch.equal(v, frozen[n][k]), (n, k)
    assert any(not torch.equal(v, cn_before[k]) for k, v in m.controlnet.state_dict().items())
    # after training, the condition passed through the dict changes the prediction
    with torch.no_grad():
        a = m.predict(x, t, cond)
        cond2 = dict(cond, controlnet_cond=1 - cond["controlnet_cond"])
        b = m.predict(x, t, cond2)
    assert (a - b).abs().max() > 1e-4


def test_missing_condition_and_lora_are_errors(sd_model):
    from genalign.config import LoraConfig

    cond, x, t = _cond(sd_model)
    del cond["controlnet_cond"]
    with pytest.raises(KeyError, match="controlnet_cond"):
        sd_model.predict(x, t, cond)
    with pytest.raises(ValueError, match="lora"):
        ControlNetAdapter(tiny_sd_pipeline(), lora=LoraConfig())
    with pytest.raises(ValueError, match="one condition"):
        sd_model.sample(["a"], None)


def test_export_loads_in_vanilla_diffusers_with_identical_outputs(tmp_path):
    from diffusers import ControlNetModel, DiffusionPipeline, StableDiffusionControlNetPipeline

    m = ControlNetAdapter(tiny_sd_pipeline())
    _perturb(m.controlnet)
    m.write_export(tmp_path / "exp")
    cn = ControlNetModel.from_pretrained(tmp_path / "exp" / "controlnet")  # vanilla ControlNet folder
    cond, x, t = _cond(m)
    with torch.no_grad():
        down_a, mid_a = m.controlnet_residuals(x, t, cond)
        down_b, mid_b = cn(x, t, encoder_hidden_states=cond["encoder_hidden_states"],
                           controlnet_cond=cond["controlnet_cond"], return_dict=False)
    assert torch.allclose(mid_a, mid_b, atol=1e-6) and mid_a.abs().max() > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(down_a, down_b))
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "exp")
    assert isinstance(pipe, StableDiffusionControlNetPipeline)
    pipe.set_progress_bar_config(disable=True)
    c = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(num_inference_steps=3, guidance_scale=1.0)
    ours = m.sample(["a handwritten digit 5"], c, generator=[torch.Generator().manual_seed(7)], **kw)
    theirs = pipe(["a handwritten digit 5"], image=c, generator=[torch.Generator().manual_seed(7)], output_type="pt",
                  height=8, width=8, **kw).images
    assert torch.allclose(ours, theirs.float(), atol=1e-5)
    # a folder that already is a ControlNet pipeline brings its ControlNet back
    again = ControlNetAdapter(pipe)
    assert torch.equal(again.controlnet.controlnet_mid_block.weight, m.controlnet.controlnet_mid_block.weight)


def test_set_controlnet_from_checkpoint_and_mismatch(tmp_path):
    m = ControlNetAdapter(tiny_sd_pipeline())
    src = controlnet_from_unet(m.unet, vae_scale_factor=1)
    _perturb(src, seed=5)
    src.save_pretrained(tmp_path / "cn")
    m.set_controlnet(str(tmp_path / "cn"))
    assert torch.equal(m.controlnet.controlnet_mid_block.weight, src.controlnet_mid_block.weight)
    assert {id(p) for p in m.trainable_parameters()} == {id(p) for p in m.controlnet.parameters()}
    assert m.pipe.controlnet is m.controlnet
    m.set_controlnet("unet")
    assert m.controlnet.controlnet_mid_block.weight.abs().max() == 0
    from genalign.pipelines.tiny import tiny_unet

    other = controlnet_from_unet(tiny_unet(block_out_channels=(16, 32)), vae_scale_factor=1)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="block_out_channels"):
        m.set_controlnet(str(tmp_path / "other"))


def test_sdxl_controlnet_trains_and_samples():
    from diffusers import StableDiffusionXLControlNetPipeline

    m = ControlNetAdapter(tiny_sdxl_pipeline())
    assert isinstance(m.pipe, StableDiffusionXLControlNetPipeline) and m.sdxl
    cond, x, t = _cond(m)
    assert set(cond) >= {"text_embeds", "time_ids", "controlnet_cond"}
    m.predict(x, t, cond).pow(2).mean().backward()
    assert m.controlnet.controlnet_mid_block.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.unet.parameters())
    img = m.sample(["a digit"], torch.rand(1, 3, 8, 8), num_inference_steps=2,
                   generator=[torch.Generator().manual_seed(0)])
    assert img.shape == (1, 3, 8, 8) and torch.isfinite(img).all()


def test_tiny_builder():
    from diffusers import StableDiffusionControlNetPipeline

    pipe = tiny_controlnet_pipeline()
    assert isinstance(pipe, StableDiffusionControlNetPipeline)
    assert tuple(pipe.controlnet.config.conditioning_embedding_out_channels) == (16,)
