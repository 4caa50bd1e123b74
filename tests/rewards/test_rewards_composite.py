"""CompositeReward / RewardSpec / RunningNorm: weighting, normalisation, logging, state_dict."""

from __future__ import annotations

import io

import pytest
import torch

from genalign.rewards.composite import (
    CompositeReward,
    RewardSpec,
    RunningNorm,
    rank_normalize,
    zscore,
)
from genalign.rewards.style import Contrast, InkMass


def _images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 8, 8, generator=g)
    x[0] = 0.0
    x[4] = 1.0
    x[4, :, ::2] = 0.0  # stripes: high contrast, no tie with the flat image 0
    return x


def test_weighted_sum_and_metrics():
    x = _images()
    comp = CompositeReward.from_specs(
        [RewardSpec(name="ink_mass", weight=2.0), {"name": "contrast", "weight": -0.5}], tiny=True
    )
    assert comp.names == ["ink_mass", "contrast"]
    total = comp(x)
    ink, con = InkMass()(x), Contrast()(x)
    torch.testing.assert_close(total, 2.0 * ink - 0.5 * con)
    m = comp.last_metrics
    assert set(m) == {
        "reward/ink_mass", "reward/ink_mass/std", "reward/ink_mass/weighted",
        "reward/contrast", "reward/contrast/std", "reward/contrast/weighted", "reward/total",
    }
    assert m["reward/ink_mass"] == pytest.approx(ink.mean().item(), abs=1e-6)
    assert m["reward/ink_mass/std"] == pytest.approx(ink.std(unbiased=False).item(), abs=1e-6)
    assert m["reward/ink_mass/weighted"] == pytest.approx(2.0 * ink.mean().item(), abs=1e-6)
    assert m["reward/contrast/weighted"] == pytest.approx(-0.5 * con.mean().item(), abs=1e-6)
    assert m["reward/total"] == pytest.approx(total.mean().item(), abs=1e-6)
    comps = comp.components(x)
    torch.testing.assert_close(comps["ink_mass"], ink)
    torch.testing.assert_close(comps["contrast"], con)


def test_zscore_and_rank_normalisation():
    x = _images()
    comp = CompositeReward.from_specs(
        [RewardSpec(name="ink_mass", weight=1.0, normalize="zscore"), RewardSpec(name="contrast", weight=3.0, normalize="rank")]
    )
    ink, con = InkMass()(x), Contrast()(x)
    z = (ink - ink.mean()) / (ink.std(unbiased=False) + 1e-8)
    ranks = con.argsort().argsort().float() / 4
    torch.testing.assert_close(comp(x), z + 3.0 * ranks)
    assert comp.last_metrics["reward/ink_mass/weighted"] == pytest.approx(0.0, abs=1e-6)  # z-scores have mean 0
    assert comp.last_metrics["reward/contrast/weighted"] == pytest.approx(1.5, abs=1e-6)  # 3 · mean rank 0.5
    assert comp.last_metrics["reward/ink_mass"] == pytest.approx(ink.mean().item(), abs=1e-6)  # raw logged
    assert not comp.differentiable  # rank has no gradient


def test_rank_ties_and_small_batches():
    torch.testing.assert_close(rank_normalize(torch.tensor([1.0, 1.0, 3.0])), torch.tensor([0.25, 0.25, 1.0]))
    torch.testing.assert_close(rank_normalize(torch.tensor([2.0])), torch.tensor([0.5]))
    torch.testing.assert_close(zscore(torch.tensor([2.0])), torch.tensor([0.0]))


def test_differentiable_flag_and_gradient():
    comp = CompositeReward.from_specs(["ink_mass", {"name": "contrast", "normalize": "zscore"}])
    assert comp.differentiable
    x = _images().requires_grad_(True)
    comp(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    comp2 = CompositeReward.from_specs(["ink_mass", "jpeg-compressibility"])
    assert not comp2.differentiable


def test_duplicate_names_set_rewards_and_errors():
    comp = CompositeReward.from_specs(["ink_mass", {"name": "ink_mass", "weight": 2.0}])
    assert comp.names == ["ink_mass", "ink_mass#2"]
    torch.testing.assert_close(comp(_images()), 3.0 * InkMass()(_images()))
    with pytest.raises(ValueError, match="set reward"):
        CompositeReward.from_specs([{"name": "vendi"}])
    with pytest.raises(KeyError, match="known"):
        CompositeReward.from_specs(["no-such-reward"])
    with pytest.raises(ValueError):
        RewardSpec(name="ink_mass", normalize="minmax")
    with pytest.raises(TypeError):
        CompositeReward.from_specs([{"name": "ink_mass", "wieght": 1.0}])
    with pytest.raises(TypeError):  # spec kwargs are strict
        CompositeReward.from_specs([{"name": "ink_mass", "kwargs": {"bogus": 1}}])


def test_running_norm_state_survives_save_load():
    torch.manual_seed(0)
    r = RunningNorm(InkMass())
    assert not r.training
    r.train()
    batches = [torch.rand(4, 1, 6, 6) * s for s in (0.5, 1.0, 2.0)]
    means = torch.cat([InkMass()(b) for b in batches])
    for b in batches:
        r(b)
    assert r.stats.count.item() == 12
    assert r.stats.mean.item() == pytest.approx(means.double().mean().item(), abs=1e-6)
    assert r.stats.var.item() == pytest.approx(means.double().var(unbiased=False).item(), abs=1e-6)
    sd = r.state_dict()
    assert {"stats.mean", "stats.var", "stats.count"} <= set(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    r2 = RunningNorm(InkMass())
    r2.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.rand(3, 1, 6, 6)
    r.eval()
    torch.testing.assert_close(r2(x), r(x))
    expected = (InkMass()(x) - means.mean()) / (means.var(unbiased=False) + 1e-8).sqrt()
    torch.testing.assert_close(r2(x), expected, atol=1e-5, rtol=1e-5)
    before = r2.stats.count.item()
    r2(x)  # eval: frozen
    assert r2.stats.count.item() == before


def test_running_normalize_in_composite_is_in_state_dict():
    comp = CompositeReward.from_specs([{"name": "ink_mass", "normalize": "running"}])
    comp.train()
    comp(_images())
    sd = comp.state_dict()
    assert any(k.startswith("running.") and k.endswith("count") for k in sd)
    assert sd["running.0.count"].item() == 5
    comp.eval()
    comp(_images())
    assert comp.state_dict()["running.0.count"].item() == 5
