"""Preprocessing parity, transformers-5 unwrap, PickScore / HPS / CLIPScore formulas and gradients (tiny)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from genalign.rewards.base import WeightEntry, WeightsNotFoundError, resolve_weight_file
from genalign.rewards.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    clip_resize_crop,
    letterbox,
    letterbox_geometry,
    normalize,
    quantize_uint8,
    unwrap_features,
)


def test_unwrap_features_tensor_and_model_output():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    t = torch.randn(2, 4)
    assert unwrap_features(t) is t
    out = BaseModelOutputWithPooling(last_hidden_state=torch.randn(2, 3, 8), pooler_output=t)
    assert unwrap_features(out) is t
    with pytest.raises(TypeError):
        unwrap_features("nope")


@pytest.mark.parametrize("shape", [(256, 256), (300, 420), (512, 333), (100, 150)])
@pytest.mark.parametrize("proc_name", ["CLIPImageProcessorPil", "CLIPImageProcessor"])
def test_resize_crop_parity_with_processors(shape, proc_name):
    import transformers

    proc_cls = getattr(transformers, proc_name, None)
    if proc_cls is None:
        pytest.skip(f"{proc_name} not available")
    try:
        proc = proc_cls()
    except ImportError:
        pytest.skip(f"{proc_name} backend missing")
    g = torch.Generator().manual_seed(1)
    x = quantize_uint8(torch.rand(2, 3, *shape, generator=g))  # uniform noise: the worst case
    ours = normalize(clip_resize_crop(x, 224), CLIP_MEAN, CLIP_STD)
    arr = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    ref = proc(images=[np.ascontiguousarray(a) for a in arr], return_tensors="pt")["pixel_values"]
    assert ref.shape == ours.shape == (2, 3, 224, 224)
    diff = (ours - ref).abs()
    # card tolerance: max ≤ 0.06, mean ≤ 0.01; the PIL-style two-pass resize reaches ≈0.016 (uint8 rounding only)
    assert diff.max().item() <= 0.03, diff.max().item()
    assert diff.mean().item() <= 0.01, diff.mean().item()


def test_plain_torch_bicubic_is_not_pil():
    """Guard: torch's float antialiased bicubic skips PIL's intermediate clip (why pil_resize exists)."""
    g = torch.Generator().manual_seed(1)
    x = quantize_uint8(torch.rand(1, 3, 256, 256, generator=g))
    a = clip_resize_crop(x, 224, kernel="torch")
    b = clip_resize_crop(x, 224, kernel="pil")
    assert (a - b).abs().max() > 0.03


def test_letterbox_geometry_and_square_equivalence():
    assert letterbox_geometry(768, 1024, 224) == (168, 224, (0, 0, 28, 28))
    assert letterbox_geometry(1024, 768, 224) == (224, 168, (28, 28, 0, 0))
    x = torch.rand(1, 3, 768, 1024) * 0.5 + 0.25
    lb = letterbox(x, 224)
    assert lb.shape == (1, 3, 224, 224)
    assert lb[..., :28, :].abs().max() == 0 and lb[..., -28:, :].abs().max() == 0  # black bars before normalising
    assert lb[..., 28:-28, :].min() > 0.1
    sq = torch.rand(2, 3, 300, 300)
    torch.testing.assert_close(letterbox(sq, 224), clip_resize_crop(sq, 224, kernel="torch"))
    torch.testing.assert_close(letterbox(sq, 224, kernel="pil"), clip_resize_crop(sq, 224))


def test_pickscore_logit_scale_and_probs(tiny_pickscore, images):
    r = tiny_pickscore
    x = images(4)
    prompts = ["a cat", "a cat", "a dog", "a dog"]
    cos = r.cosine(x, prompts)
    s = r(x, prompts)
    scale = r.model.logit_scale.exp().item()
    assert scale == pytest.approx(100.0, rel=1e-4)
    torch.testing.assert_close(s, scale * cos)
    assert s.shape == (4,) and s.dtype == torch.float32
    p = r.probs(x, prompts)
    assert p[:2].sum().item() == pytest.approx(1.0, abs=1e-5) and p[2:].sum().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(p[:2], torch.softmax(s[:2], 0))
    # batch independence
    assert r(x[2:3], ["a dog"]).item() == pytest.approx(s[2].item(), abs=1e-3)


def test_pickscore_gradient_and_distinct_images(tiny_pickscore, images):
    x = images(2, seed=3).requires_grad_(True)
    s = tiny_pickscore(x, ["a red ball"])
    assert abs(s[0].item() - s[1].item()) > 1e-4
    s.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_pickscore_reference_mode_close_to_tensor(tiny_pickscore, images):
    from genalign.rewards.clip import PickScore

    ref = PickScore(tiny=True, preprocess="reference")
    x = quantize_uint8(images(2, 300, 260))
    a = tiny_pickscore.score(x, ["a", "b"])
    b = ref.score(x, ["a", "b"])
    assert torch.allclose(a, b, atol=0.5), (a, b)  # logits ≈ 100·cos: small preprocessing gap


def test_pickscore_loads_saved_folder(tmp_path, tiny_pickscore, images):
    from genalign.rewards.clip import PickScore

    tiny_pickscore.model.save_pretrained(tmp_path)
    tiny_pickscore.tokenizer.save_pretrained(tmp_path)
    loaded = PickScore(weights=str(tmp_path))
    x = images(2)
    torch.testing.assert_close(loaded.score(x, ["a cat", "x"]), tiny_pickscore.score(x, ["a cat", "x"]))


def test_hps_is_plain_cosine_with_letterbox(tiny_hps, images):
    r = tiny_hps
    x = images(2, 180, 320)
    prompts = ["a cat", "a dog"]
    with torch.no_grad():
        pix = normalize(letterbox(x, 224), CLIP_MEAN, CLIP_STD)
        img = torch.nn.functional.normalize(r.model.encode_image(pix), dim=-1)
        txt = torch.nn.functional.normalize(r.model.encode_text(r.tokenizer(prompts)), dim=-1)
        r.model.logit_scale.fill_(math.log(100.0))  # must not enter the score
    s = r.score(x, prompts)
    torch.testing.assert_close(s, (img * txt).sum(-1), atol=1e-5, rtol=1e-5)
    assert (s.abs() <= 1.0).all()


def test_hps_gradient_and_distinct_images(tiny_hps, images):
    x = images(2, seed=5).requires_grad_(True)
    s = tiny_hps(x, ["a red ball"])
    assert s.shape == (2,) and abs(s[0].item() - s[1].item()) > 1e-5
    s.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_hps_checkpoint_layout_roundtrip(tmp_path, tiny_hps, images):
    from genalign.rewards.clip import HPSv21

    sd = {k: v.half() for k, v in tiny_hps.model.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "HPS_v2.1_compressed.pt")
    loaded = HPSv21(tiny=True, weights=str(tmp_path / "HPS_v2.1_compressed.pt"))
    x = images(2)
    torch.testing.assert_close(loaded.score(x, ["a", "b"]), tiny_hps.score(x, ["a", "b"]), atol=5e-3, rtol=0)
    bad = dict(sd)
    bad["extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": bad}, tmp_path / "bad.pt")
    with pytest.raises(KeyError, match="unexpected"):
        HPSv21(tiny=True, weights=str(tmp_path / "bad.pt"))


def test_sha256_mismatch_refuses(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    with pytest.raises(ValueError, match="sha256"):
        resolve_weight_file(WeightEntry("x/y", "w.bin", sha256="0" * 64), f)


def test_clipscore_definitions():
    from genalign.rewards.clip import clipscore_hessel, clipscore_torchmetrics

    cos = torch.tensor([0.3, -0.5])
    # torchmetrics clamps the batch MEAN: 100·mean = −10 → 0
    assert clipscore_torchmetrics(cos).item() == 0.0
    # Hessel clamps per pair: distinct values, 2.5·0.3 and 0
    torch.testing.assert_close(clipscore_hessel(cos), torch.tensor([0.75, 0.0]))
    assert clipscore_torchmetrics(torch.tensor([0.3, 0.1])).item() == pytest.approx(20.0, abs=1e-4)


def test_clipscore_reward_cosine_unclamped_and_hessel(tiny_pickscore, images):
    from genalign.rewards.clip import CLIPScore

    cs = CLIPScore(tiny=True)
    x = images(6, seed=7)
    prompts = ["a", "b", "c", "d", "e", "f"]
    cos = cs.score(x, prompts)
    assert (cos.abs() <= 1).all()
    assert (cos < 0).any(), "random tiny CLIP should give some negative cosines"  # clamp must not apply
    hes = CLIPScore(tiny=True, definition="hessel", prefix="")
    torch.testing.assert_close(hes.score(x, prompts), 2.5 * cos.clamp_min(0))
    xg = x.clone().requires_grad_(True)
    cs(xg, prompts).sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["pickscore-v1", "hps-v2.1", "hps-v2.0", "clipscore"])
def test_missing_weights_offline_error(name, offline):
    from genalign.registry import rewards as REWARDS

    if name.startswith("hps"):
        pytest.importorskip("open_clip")
    cls = REWARDS.get(name)
    with pytest.raises(WeightsNotFoundError, match="weights"):
        cls()
    with pytest.raises(WeightsNotFoundError):
        cls(weights="/nonexistent/path")
