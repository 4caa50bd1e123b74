"""Pure-math rewards: FAD distance, Vendi score, JPEG size, style statistics (no weights, no network)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from genalign.rewards.fad import (
    FADDataset,
    FADSong,
    ReferenceStats,
    frechet_distance,
    gaussian_stats,
    symmetric_sqrt,
)
from genalign.rewards.jpeg import JpegCompressibility, JpegIncompressibility, jpeg_size_kb
from genalign.rewards.style import Contrast, InkMass
from genalign.rewards.vendi import Vendi, vendi_score

torch.set_default_dtype(torch.float32)


def _rand_cov(d: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, rank or d, generator=g, dtype=torch.float64)
    return a @ a.T / (rank or d) + (0 if rank else 0.1) * torch.eye(d, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------- FAD


def test_fd_identical_gaussians_is_zero():
    mu, cov = torch.randn(6, dtype=torch.float64), _rand_cov(6, 0)
    assert abs(frechet_distance(mu, cov, mu, cov).item()) < 1e-9


def test_fd_mean_shift_equals_squared_norm():
    cov = _rand_cov(5, 1)
    mu = torch.randn(5, dtype=torch.float64)
    delta = torch.tensor([0.5, -1.0, 2.0, 0.0, 0.25], dtype=torch.float64)
    fd = frechet_distance(mu + delta, cov, mu, cov)
    assert fd.item() == pytest.approx(delta.pow(2).sum().item(), abs=1e-9)


def test_fd_diagonal_covariances_closed_form():
    a = torch.tensor([1.0, 4.0, 0.25, 9.0], dtype=torch.float64)
    b = torch.tensor([4.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    z = torch.zeros(4, dtype=torch.float64)
    fd = frechet_distance(z, torch.diag(a), z, torch.diag(b))
    assert fd.item() == pytest.approx((a.sqrt() - b.sqrt()).pow(2).sum().item(), abs=1e-10)


def test_fd_matches_scipy_sqrtm_float64_and_is_symmetric():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    d = 16
    c1, c2 = _rand_cov(d, 2), _rand_cov(d, 3)
    m1, m2 = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    covmean = scipy_linalg.sqrtm(c1.numpy() @ c2.numpy())
    covmean = np.real(covmean)
    ref = float(((m1 - m2) ** 2).sum() + np.trace(c1.numpy()) + np.trace(c2.numpy()) - 2 * np.trace(covmean))
    ours = frechet_distance(m1, c1, m2, c2).item()
    assert ours == pytest.approx(ref, abs=1e-8)
    assert frechet_distance(m2, c2, m1, c1).item() == pytest.approx(ours, abs=1e-8)
    # float32 inputs are upcast: same value
    assert frechet_distance(m1.float(), c1.float(), m2.float(), c2.float()).dtype == torch.float64


def test_symmetric_sqrt_squares_back():
    c = _rand_cov(7, 4)
    s = symmetric_sqrt(c)
    torch.testing.assert_close(s @ s, c, atol=1e-10, rtol=0)


def test_gaussian_stats_unbiased():
    x = torch.randn(50, 3, dtype=torch.float64)
    mu, cov = gaussian_stats(x)
    torch.testing.assert_close(cov, torch.from_numpy(np.cov(x.numpy(), rowvar=False)), atol=1e-12, rtol=0)


def test_fad_song_rank_deficient_is_finite_with_gradient():
    d, t = 12, 5  # T < D: per-clip covariance is rank-deficient
    ref = ReferenceStats(torch.zeros(d), _rand_cov(d, 5))
    r = FADSong(reference=ref)
    x = torch.randn(3, t, d, requires_grad=True)
    scores = r(x)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all() and (scores <= 1e-6).all()
    scores.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # batch-independence: item 1 alone scores the same
    assert r(x[1:2].detach()).item() == pytest.approx(scores[1].item(), rel=1e-5)


def test_fad_song_frames_encoder_on_latents():
    c, t = 4, 32
    ref = ReferenceStats(torch.zeros(c), torch.eye(c))
    r = FADSong(reference=ref, encoder="frames")
    near = torch.randn(2, c, t)  # frames ~ N(0, I): close to the reference
    far = near + 3.0
    assert (r(near) > r(far)).all()


def test_fad_dataset_set_reward_and_leave_one_out(tmp_path):
    g = torch.Generator().manual_seed(0)
    ref_emb = torch.randn(400, 4, generator=g)
    stats = ReferenceStats.from_embeddings(ref_emb, encoder="identity")
    digest = stats.save(tmp_path / "ref.safetensors")
    loaded = ReferenceStats.load(tmp_path / "ref.safetensors", sha256=digest)
    torch.testing.assert_close(loaded.cov, stats.cov)
    assert loaded.meta["encoder"] == "identity"
    with pytest.raises(ValueError):
        ReferenceStats.load(tmp_path / "ref.safetensors", sha256="0" * 64)

    r = FADDataset(reference=str(tmp_path / "ref.safetensors"))
    assert r.kind == "set"
    gen = torch.randn(40, 4, generator=g)
    gen[0] += 10.0  # an outlier: removing it improves the set → negative credit
    val = r(gen)
    assert val.ndim == 0 and val.item() < 0
    credit = r.contributions(gen)
    assert credit.shape == (40,)
    assert credit.argmin().item() == 0 and credit[0] < 0
    # credit definition: r(D) − r(D∖i)
    assert credit[3].item() == pytest.approx(val.item() - r(torch.cat([gen[:3], gen[4:]])).item(), abs=1e-4)


def test_fad_missing_reference_raises():
    from genalign.rewards.base import WeightsNotFoundError

    with pytest.raises(WeightsNotFoundError):
        FADDataset()
    with pytest.raises(WeightsNotFoundError):
        FADDataset(reference="/nonexistent/stats.safetensors")


# ---------------------------------------------------------------------------------------------------- Vendi


def test_vendi_identical_items_is_one():
    x = torch.randn(1, 8).repeat(10, 1)
    for q in (0.5, 1.0, 2.0, math.inf):
        assert vendi_score(x, q).item() == pytest.approx(1.0, abs=1e-9)


def test_vendi_orthogonal_items_is_n():
    x = torch.eye(6)[:5] * torch.tensor([[1.0], [2.0], [3.0], [0.5], [7.0]])  # scale must not matter
    for q in (0.5, 1.0, 2.0, "inf"):
        assert vendi_score(x, q).item() == pytest.approx(5.0, abs=1e-9)


def test_vendi_orders_against_hand_values():
    # two copies of e1 and one e2: K/n has eigenvalues (2/3, 1/3)
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    p = np.array([2 / 3, 1 / 3])
    hand = {
        1.0: math.exp(-(p * np.log(p)).sum()),
        2.0: 1.0 / (p**2).sum(),
        0.5: (np.sqrt(p).sum()) ** 2,  # exp(log(Σ√λ)/(1−0.5))
        math.inf: 1.5,
    }
    for q, v in hand.items():
        assert vendi_score(x, q).item() == pytest.approx(v, abs=1e-10), q
    # q = 1 must differ from q = 2 (the vendi-score 0.0.3 bug ignores q)
    assert abs(vendi_score(x, 1.0) - vendi_score(x, 2.0)) > 0.05


def test_vendi_primal_equals_dual_and_order_invariance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)  # d < n → dual path
    k = torch.nn.functional.normalize(x.double(), dim=1)
    lam = torch.linalg.eigvalsh(k @ k.T / 12).clamp_min(0)
    lam = lam[lam > 1e-12]
    primal = torch.exp(-(lam * lam.log()).sum())
    assert vendi_score(x).item() == pytest.approx(primal.item(), abs=1e-9)
    perm = torch.randperm(12, generator=g)
    assert vendi_score(x[perm]).item() == pytest.approx(vendi_score(x).item(), abs=1e-9)
    assert vendi_score(x * 3.7).item() == pytest.approx(vendi_score(x).item(), abs=1e-9)


def test_vendi_reward_gradient_and_contributions():
    r = Vendi(q=1.0)
    x = torch.randn(6, 4, requires_grad=True)
    v = r(x)
    assert v.ndim == 0 and 1.0 <= v.item() <= 6.0
    v.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    dup = torch.cat([torch.eye(3), torch.eye(3)[:1]])  # item 3 duplicates item 0
    c = r.contributions(dup)
    assert c.shape == (4,) and c[1] > c[0] and c[2] > c[3]
    with pytest.raises(ValueError):
        Vendi(q=-1)


# ---------------------------------------------------------------------------------------------------- JPEG


def test_jpeg_noise_bigger_than_flat_and_sign():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 3, 128, 128, generator=g)
    flat = torch.full((1, 3, 128, 128), 0.5)
    x = torch.cat([noise, flat])
    inc = JpegIncompressibility()(x)
    comp = JpegCompressibility()(x)
    assert inc.shape == (2,) and inc.dtype == torch.float32
    assert inc[0] > 5 * inc[1]
    torch.testing.assert_close(comp, -inc)
    # kB = bytes / 1000: uniform RGB noise at q95 is ~1 byte/pixel/channel-ish; flat grey is a few hundred bytes
    assert 10.0 < inc[0].item() < 3 * 128 * 128 / 1000 * 1.5
    assert inc[1].item() < 3.0
    assert torch.allclose(jpeg_size_kb(x[:1]), inc[:1])


def test_jpeg_raises_when_gradients_requested():
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        JpegIncompressibility()(x)
    assert JpegIncompressibility().score(x).shape == (1,)  # score() is no_grad: fine
    assert JpegIncompressibility.differentiable is False


def test_jpeg_per_megapixel_and_grey():
    x = torch.rand(2, 1, 64, 64)
    kb = JpegIncompressibility()(x)
    per = JpegIncompressibility(per_megapixel=True)(x)
    torch.testing.assert_close(per, kb / (64 * 64 / 1e6))


# ---------------------------------------------------------------------------------------------------- style


def test_ink_mass_and_contrast_values_and_gradients():
    x = torch.zeros(2, 1, 4, 4)
    x[0, 0, :2] = 1.0  # half ink
    x[1] = 0.25  # flat
    x.requires_grad_(True)
    ink, con = InkMass(), Contrast()
    torch.testing.assert_close(ink(x), torch.tensor([0.5, 0.25]))
    c = con(x)
    assert c[0].item() == pytest.approx(0.5, abs=1e-5)  # sqrt(p(1−p)) at p = 0.5
    assert c[1].item() == pytest.approx(0.0, abs=1e-5)
    (ink(x).sum() + con(x).sum()).backward()
    assert torch.isfinite(x.grad).all() and x.grad[0].abs().sum() > 0
    assert InkMass.differentiable and Contrast.differentiable
