"""Aesthetic, ImageReward and CLAP on tiny random models: formulas, converters, gradients, front ends."""

from __future__ import annotations

import math

import pytest
import torch

from genalign.rewards.base import WeightsNotFoundError


# ------------------------------------------------------------------------------------------------ aesthetic


@pytest.fixture(scope="module")
def tiny_aesthetic():
    from genalign.rewards.aesthetic import LaionAesthetic

    return LaionAesthetic(tiny=True)


def test_aesthetic_head_is_affine_and_uses_unit_embeddings(tiny_aesthetic, images):
    r = tiny_aesthetic
    x = images(3)
    e = r.embed(x)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))  # L2-normalised before the head
    w, b = r.head.affine()
    collapsed = (e.double() @ w + b).float()
    torch.testing.assert_close(r.score(x), collapsed, atol=1e-6, rtol=1e-6)
    # dropout must be off: repeated calls are identical
    torch.testing.assert_close(r.score(x), r.score(x))


def test_aesthetic_upstream_head_layout_loads(tmp_path, tiny_aesthetic, images):
    from genalign.rewards.aesthetic import LaionAesthetic, MLPHead

    torch.manual_seed(3)
    head = MLPHead(768).eval()
    sd = head.state_dict()
    assert sorted({k.split(".")[1] for k in sd}) == ["0", "2", "4", "6", "7"]  # upstream keys layers.{0,2,4,6,7}
    torch.save(sd, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    r = LaionAesthetic(tiny=True, weights=str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"))
    x = images(2)
    torch.testing.assert_close(r.score(x), head(tiny_aesthetic.embed(x)).squeeze(-1), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="sha256"):
        LaionAesthetic(tiny=True, weights=str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"), head_sha256="0" * 64)


def test_aesthetic_gradient(tiny_aesthetic, images):
    x = images(2, seed=11).requires_grad_(True)
    s = tiny_aesthetic(x)
    assert s.shape == (2,) and abs(s[0].item() - s[1].item()) > 1e-6
    s.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ ImageReward


@pytest.fixture(scope="module")
def tiny_ir():
    from genalign.rewards.imagereward import ImageReward

    return ImageReward(tiny=True)


def _to_upstream(key: str) -> str:
    """HF → upstream (timm/BLIP) names, written independently of the converter under test."""
    rep = [
        ("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
        ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
        ("vision_model.embeddings.patch_embedding.", "visual_encoder.patch_embed.proj."),
        ("vision_model.post_layernorm.", "visual_encoder.norm."),
        ("vision_model.encoder.layers.", "visual_encoder.blocks."),
        (".layer_norm1.", ".norm1."), (".layer_norm2.", ".norm2."),
        (".self_attn.qkv.", ".attn.qkv."), (".self_attn.projection.", ".attn.proj."),
    ]
    for a, b in rep:
        key = key.replace(a, b)
    return "blip." + key if not key.startswith("mlp.") else key


def test_imagereward_converter_upstream_layout(tmp_path, tiny_ir, images):
    from genalign.rewards.imagereward import ImageReward

    sd = {_to_upstream(k): v.clone() for k, v in tiny_ir.state_dict().items()}
    assert "blip.visual_encoder.blocks.0.attn.qkv.weight" in sd and "mlp.layers.7.bias" in sd
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(64)[None]
    sd["blip.vision_proj.weight"] = torch.zeros(4, 32)
    sd["blip.text_proj.weight"] = torch.zeros(4, 32)
    torch.save(sd, tmp_path / "ImageReward.pt")
    loaded = ImageReward(tiny=True, weights=str(tmp_path / "ImageReward.pt"))
    assert sorted(loaded.dropped_keys) == sorted(
        ["blip.text_encoder.embeddings.position_ids", "blip.vision_proj.weight", "blip.text_proj.weight"]
    )
    x = images(2)
    torch.testing.assert_close(loaded.score(x, ["a cat", "a dog"]), tiny_ir.score(x, ["a cat", "a dog"]))
    sd.pop("mlp.layers.0.weight")
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(KeyError, match="missing"):
        ImageReward(tiny=True, weights=str(tmp_path / "broken.pt"))


def test_imagereward_constants_and_text_length(tiny_ir, images):
    from genalign.rewards.imagereward import IMAGEREWARD_MEAN, IMAGEREWARD_STD

    x = images(2)
    prompts = ["a photo of a red ball", "a dog"]
    raw = tiny_ir.mlp(tiny_ir.features(x, prompts)).squeeze(-1)
    torch.testing.assert_close(tiny_ir.score(x, prompts), (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD)
    tok = tiny_ir.tokenize(["a " * 100])
    assert tok["input_ids"].shape == (1, 35)
    assert tok["input_ids"][0, 0].item() == tiny_ir.tokenizer.cls_token_id  # [CLS] kept, not [ENC]
    assert len(tiny_ir.tokenizer) == 19 + 2  # toy vocab + [DEC] + [ENC]


def test_imagereward_image_dependence_and_gradient(tiny_ir, images):
    # guards the BLIP initializer_range trap (default 1e-10 → a nearly constant vision tower): the vision
    # features of two different images must differ at O(1), not ~1e-5
    x = images(2, seed=21)
    with torch.no_grad():
        v = tiny_ir.vision_model(pixel_values=tiny_ir.pixels(x)).last_hidden_state
    assert (v[0] - v[1]).abs().mean() > 0.05
    f = tiny_ir.features(x, ["a cat", "a cat"])
    assert (f[0] - f[1]).abs().max() > 1e-3
    xg = x.clone().requires_grad_(True)
    s = tiny_ir(xg, ["a cat", "a cat"])
    assert s[0].item() != s[1].item()
    s.sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ audio front end + CLAP


def test_torch_logmel_matches_clap_feature_extractor():
    from transformers import ClapFeatureExtractor

    from genalign.rewards.preprocess import LogMel, repeatpad

    fe = ClapFeatureExtractor(frequency_min=50, truncation="rand_trunc")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(480_000, generator=g) * 0.1  # exactly 10 s at 48 kHz
    ref = fe(x.numpy(), sampling_rate=48_000, return_tensors="pt")["input_features"]
    ours = LogMel(f_min=50)(x[None])
    assert ours.shape == ref.shape == (1, 1, 1001, 64)
    assert (ours - ref).abs().max().item() <= 1e-4
    short = x[:100_000]  # 2.08 s → repeatpad
    ref2 = fe(short.numpy(), sampling_rate=48_000, return_tensors="pt")["input_features"]
    assert (LogMel(f_min=50)(repeatpad(short[None], 480_000)) - ref2).abs().max().item() <= 1e-4


def test_repeatpad_and_resample():
    from genalign.rewards.preprocess import repeatpad, resample

    x = torch.arange(1.0, 4.0)[None]  # length 3 → 3 whole copies in 10, then zeros
    torch.testing.assert_close(repeatpad(x, 10), torch.tensor([[1.0, 2, 3, 1, 2, 3, 1, 2, 3, 0]]))
    sr1, sr2, f = 44_100, 48_000, 440.0
    t1 = torch.arange(sr1 // 10, dtype=torch.float64) / sr1
    y = resample(torch.sin(2 * math.pi * f * t1)[None], sr1, sr2)
    assert y.shape[-1] == math.ceil(sr2 * t1.numel() / sr1)
    t2 = torch.arange(y.shape[-1], dtype=torch.float64) / sr2
    mid = slice(200, -200)  # away from the zero-padded edges
    assert (y[0, mid] - torch.sin(2 * math.pi * f * t2)[mid]).abs().max() < 1e-3


@pytest.fixture(scope="module")
def tiny_clap():
    from genalign.rewards.clap import CLAPScore

    return CLAPScore(tiny=True)


def test_clap_cosine_gradient_and_windows(tiny_clap):
    r = tiny_clap
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(2, 2, 48_000 * 2, generator=g) * 0.1).requires_grad_(True)
    s = r(w, ["piano", "drums"], sample_rate=48_000)
    assert s.shape == (2,) and (s.abs() <= 1).all() and s[0] != s[1]
    manual = (r.embed(w.detach()) * r.encode_text(["piano", "drums"])).sum(-1)
    torch.testing.assert_close(s.detach(), manual)
    s.sum().backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    # 16 kHz input is resampled; a 25 s clip in "mean" mode uses 2 full windows, deterministically
    long = torch.randn(1, 16_000 * 25, generator=g) * 0.1
    wins, n = r.windows(long, 16_000)
    assert n == 2 and wins.shape == (2, 480_000)
    torch.testing.assert_close(r.score(long, ["x"], sample_rate=16_000), r.score(long, ["x"], sample_rate=16_000))


# ------------------------------------------------------------------------------------------------ offline errors


@pytest.mark.parametrize("name", ["laion-aesthetic-v2", "imagereward-v1.0", "clap"])
def test_missing_weights_offline_error_models(name, offline):
    from genalign.registry import rewards as REWARDS

    cls = REWARDS.get(name)
    with pytest.raises(WeightsNotFoundError):
        cls()
    with pytest.raises(WeightsNotFoundError):
        cls(weights="/nonexistent/file.pt")
