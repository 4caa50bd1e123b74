"""Tests for genalign.objectives.di_star (card: /work/shared/methods/di_star.md §8)."""

import copy
import math
import warnings

import pytest
import torch

from genalign.objectives.di_star import (
    DiffInstructStar,
    default_huber_c,
    di_star_divergence,
    di_star_fake_score_loss,
    di_star_generator_loss,
    effective_guidance_scale,
    sample_timesteps,
    teacher_cfg,
)
from genalign.pipelines.few_step import x0_from_noise
from genalign.pipelines.rollout import noisy_sample as _noisy
from genalign.pipelines.schedule import alpha_bar_at


def noisy_sample(x0, noise, t, ac):
    """x_t at integer timesteps t of the schedule ac (the pipelines' VP noising)."""
    return _noisy(x0, noise, alpha_bar_at(ac, t))

SDXL = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _sdxl_alphas_cumprod():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def test_config_defaults():
    cfg = DiffInstructStar.Config()
    assert cfg.alpha == 100.0 and cfg.guidance_scale == 7.5 and cfg.cfg_placement == "in"
    assert (cfg.t_min, cfg.t_max, cfg.init_timestep) == (20, 980, 399)


# ------------------------------------------------------------------ one-step mapping


def test_one_step_mapping_matches_lcm():
    from diffusers import LCMScheduler

    ac = _sdxl_alphas_cumprod()
    assert ac[399].item() == pytest.approx(0.426086, abs=1e-6)
    torch.manual_seed(0)
    z = torch.randn(2, 4, 8, 8)
    eps = torch.randn_like(z)
    ours = x0_from_noise(z, eps, 399, ac)
    sched = LCMScheduler(**SDXL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched.set_timesteps(timesteps=[399])
    out = sched.step(eps, 399, z)
    torch.testing.assert_close(ours, out.denoised, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, (z - 0.757571 * eps) / 0.652753, atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------ analytic Gaussian check

A, S = 0.8, 0.6  # a_t, s_t with a² + s² = 1 (ᾱ = 0.64)
MU0 = [0.3, -0.5]
MU_REF = torch.tensor([1.0, 0.2], dtype=torch.float64)
VAR_TH = A**2 + S**2  # generator x0 = μ + ε0 ⇒ p_θ,t = N(aμ, 1)


def _var_r(sig_r):
    return A**2 * sig_r**2 + S**2  # teacher data N(μ_ref, σ_r²I) ⇒ p_ref,t = N(aμ_ref, a²σ_r² + s²)


def _exact_grad(c, distance, sig_r, n=400_000, seed=1):
    """∇_μ E_{x~p_θ,t} d(s_θ(x) − s_ref(x)) by reparameterised Monte Carlo with the true scores (float64)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.tensor(MU0, dtype=torch.float64, requires_grad=True)
    xi = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x = A * mu + math.sqrt(VAR_TH) * xi
    y = -(x - A * mu) / VAR_TH + (x - A * MU_REF) / _var_r(sig_r)
    if distance == "l2":
        d = (y**2).sum(1)
    else:
        d = torch.sqrt((y**2).sum(1) + c * c) - c
    d.mean().backward()
    return mu.grad.float()


def _surrogate_grad(c, distance, sig_r, surrogate="sim", n=400_000, seed=2, detach_direction=False,
                    detach_networks=False, detach_teacher=False):
    g = torch.Generator().manual_seed(seed)
    mu = torch.tensor(MU0, requires_grad=True)
    x0 = mu + torch.randn(n, 2, generator=g)
    noise = torch.randn(n, 2, generator=g)
    mu_psi = mu.detach()  # fake network = exact generator score at the current θ, parameters frozen
    mu_ref = MU_REF.float()
    var_r = _var_r(sig_r)

    def fake(x_t, t):
        out = S * (x_t - A * mu_psi) / VAR_TH  # ε = −s·score
        return out.detach() if detach_networks else out

    def teacher(x_t, t):
        out = S * (x_t - A * mu_ref) / var_r
        return None, (out.detach() if (detach_networks or detach_teacher) else out)

    loss, _ = di_star_generator_loss(
        x0, noise, torch.zeros(n, dtype=torch.long), torch.tensor([A * A]), fake, teacher,
        reward=0.0 * x0.sum(1),  # keeps a graph to μ even when the networks are detached
        guidance_scale=1.0, distance=distance, units="score", huber_c=c, weight=1.0,
        detach_direction=detach_direction, surrogate=surrogate,
    )
    loss.backward()
    return mu.grad


def _rel_err(g, g_ref):
    return ((g - g_ref).norm() / g_ref.norm()).item()


CASES = [("pseudo_huber", 0.5), ("pseudo_huber", 3.0), ("l2", None)]


@pytest.mark.parametrize("distance,c", CASES)
def test_card_surrogate_matches_exact_gradient_when_covariances_match(distance, c):
    # Card test 4 with teacher variance = generator variance (σ_r = 1): the card's ("sim") surrogate is exact.
    exact = _exact_grad(c, distance, sig_r=1.0)
    sur = _surrogate_grad(c, distance, sig_r=1.0)
    assert _rel_err(sur, exact) < 1e-2
    assert _rel_err(-sur, exact) > 1.9  # negative control: flipped sign ≈ 200 % error


@pytest.mark.parametrize("sig_r", [0.5, 1.5])
@pytest.mark.parametrize("distance,c", CASES)
def test_exact_surrogate_matches_for_unequal_covariances(distance, c, sig_r):
    # General Gaussian teacher: only surrogate="exact" (+d(y) term) reproduces ∇∫E d(s_θ − s_ref).
    exact = _exact_grad(c, distance, sig_r=sig_r)
    assert _rel_err(_surrogate_grad(c, distance, sig_r, surrogate="exact"), exact) < 1e-2
    # documented discrepancy of the card's form: off by ≈ the teacher/generator variance ratio
    assert _rel_err(_surrogate_grad(c, distance, sig_r, surrogate="sim"), exact) > 0.3


def test_wrong_detach_gives_wrong_or_zero_gradient():
    exact = _exact_grad(0.5, "pseudo_huber", sig_r=0.5)
    # detaching the teacher's output (gradient only through the fake network): ≈ 100 % error
    wrong = _surrogate_grad(0.5, "pseudo_huber", 0.5, surrogate="exact", detach_teacher=True)
    assert _rel_err(wrong, exact) > 0.9
    # detaching both frozen networks' outputs (DMD-style): exactly zero gradient
    for surrogate in ("sim", "exact"):
        zero = _surrogate_grad(0.5, "pseudo_huber", 0.5, surrogate=surrogate, detach_networks=True)
        assert torch.all(zero == 0)
    # detach_direction (ablation option) changes the per-sample gradient; with an *exact* fake score its extra
    # term has zero mean (E[∇log q(x_t|x0) | x_t] = s_ψ), so here it only adds/removes variance.
    d1 = _surrogate_grad(0.5, "pseudo_huber", 0.5, surrogate="exact", detach_direction=True, n=1000)
    d0 = _surrogate_grad(0.5, "pseudo_huber", 0.5, surrogate="exact", n=1000)
    assert not torch.allclose(d0, d1)


# ------------------------------------------------------------------ toy networks


class ToyEps(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.emb = torch.nn.Embedding(2, 4)

    def forward(self, x, t, cond):
        h = torch.tanh(self.conv(x)) + self.emb(cond).view(-1, 4, 1, 1) + 1e-3 * t.float().view(-1, 1, 1, 1)
        return h


def _toy_setup(seed=0):
    torch.manual_seed(seed)
    gen = torch.nn.Conv2d(4, 4, 3, padding=1)
    teacher = ToyEps(1).requires_grad_(False)
    z = torch.randn(3, 4, 6, 6)
    noise = torch.randn(3, 4, 6, 6)
    t = torch.tensor([20, 500, 980])
    return gen, teacher, z, noise, t


def _teacher_fn(teacher):
    def fn(x_t, t):
        B = x_t.shape[0]
        return teacher(x_t, t, torch.zeros(B, dtype=torch.long)), teacher(x_t, t, torch.ones(B, dtype=torch.long))

    return fn


def _fake_fn(fake):
    return lambda x_t, t: fake(x_t, t, torch.ones(x_t.shape[0], dtype=torch.long))


def test_zero_at_init_fake_equals_teacher_and_omega_one():
    gen, teacher, z, noise, t = _toy_setup()
    fake = copy.deepcopy(teacher)
    ac = _sdxl_alphas_cumprod()
    loss, m = di_star_generator_loss(gen(z), noise, t, ac, _fake_fn(fake), _teacher_fn(teacher), guidance_scale=1.0)
    loss.backward()
    assert loss.item() == 0.0 and m["u_norm"].item() == 0.0
    assert all(torch.all(p.grad == 0) for p in gen.parameters())
    # ω = 7.5: fake ≠ guided teacher ⇒ non-zero gradient
    gen.zero_grad()
    loss, _ = di_star_generator_loss(gen(z), noise, t, ac, _fake_fn(fake), _teacher_fn(teacher), guidance_scale=7.5)
    loss.backward()
    assert gen.weight.grad.abs().sum() > 0


def test_frozen_networks_receive_no_parameter_gradients_but_pass_input_gradients():
    gen, teacher, z, noise, t = _toy_setup()
    fake = ToyEps(2).requires_grad_(False)
    loss, _ = di_star_generator_loss(gen(z), noise, t, _sdxl_alphas_cumprod(), _fake_fn(fake), _teacher_fn(teacher))
    loss.backward()
    assert all(p.grad is None for p in fake.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert gen.weight.grad.abs().sum() > 0


def test_l2_identity_with_sid_x0_form():
    torch.manual_seed(0)
    ac = _sdxl_alphas_cumprod()
    x0 = torch.randn(4, 4, 5, 5)
    noise = torch.randn_like(x0)
    t = torch.tensor([30, 300, 600, 950])
    a = ac[t].sqrt().float().view(-1, 1, 1, 1)
    s = (1 - ac[t]).sqrt().float().view(-1, 1, 1, 1)
    x_t = noisy_sample(x0, noise, t, ac)
    eps_fake = torch.randn_like(x0)
    eps_ref = torch.randn_like(x0)
    w = torch.rand(4) + 0.5
    ours = di_star_divergence(eps_fake, eps_ref, noise, sigma=s.flatten(), distance="l2", units="score", weight=w)
    x0_fake = (x_t - s * eps_fake) / a
    x0_ref = (x_t - s * eps_ref) / a
    sid = (2 * a.flatten() ** 2 / s.flatten() ** 4) * w * ((x0_ref - x0_fake) * (x0_fake - x0)).flatten(1).sum(1)
    torch.testing.assert_close(ours, sid, rtol=2e-4, atol=1e-3)


def test_huber_limits_and_units_equivalence():
    torch.manual_seed(0)
    ef, er, n = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    l2 = di_star_divergence(ef, er, n, distance="l2")
    big_c = 1e5
    hub = di_star_divergence(ef, er, n, distance="pseudo_huber", huber_c=big_c)
    torch.testing.assert_close(hub * 2 * big_c, l2, rtol=1e-3, atol=1e-3)  # c → ∞: L2 scaled by 1/(2c)
    u = (ef - er).flatten(1)
    v = (ef - n).flatten(1)
    unit = -((u / u.norm(dim=1, keepdim=True)) * v).sum(1)
    torch.testing.assert_close(di_star_divergence(ef, er, n, huber_c=0.0), unit)  # c → 0: d' = u/‖u‖
    # ε units (w_ε, c_ε) ≡ score units with w = s_t, c = c_ε/s_t
    s = torch.full((3,), 0.37)
    eps_form = di_star_divergence(ef, er, n, huber_c=0.2)
    score_form = di_star_divergence(ef, er, n, sigma=s, units="score", huber_c=0.2 / 0.37, weight=s)
    torch.testing.assert_close(eps_form, score_form, rtol=1e-5, atol=1e-6)
    # the reconstruction options change the result
    assert not torch.allclose(eps_form, di_star_divergence(ef, er, n, sigma=s, units="score", huber_c=0.2))
    assert not torch.allclose(eps_form, di_star_divergence(ef, er, n, huber_c=0.5))
    assert not torch.allclose(eps_form, di_star_divergence(ef, er, n, huber_c=0.2, weight=2.0))
    default = di_star_divergence(ef, er, n)
    torch.testing.assert_close(default, di_star_divergence(ef, er, n, huber_c=0.00054 * math.sqrt(32)))
    assert default_huber_c(65536) == pytest.approx(0.13824)


def test_reward_term_alone_gives_minus_alpha_grad_r():
    gen, teacher, z, noise, t = _toy_setup()
    fake = ToyEps(2).requires_grad_(False)
    x0 = gen(z).detach().requires_grad_(True)
    k = torch.randn(4, 6, 6)
    reward = (k * x0).flatten(1).sum(1)  # linear reward
    loss, m = di_star_generator_loss(
        x0, noise, t, _sdxl_alphas_cumprod(), _fake_fn(fake), _teacher_fn(teacher), reward, alpha=100.0, weight=0.0
    )
    loss.backward()
    torch.testing.assert_close(x0.grad, (-100.0 * k / 3).expand_as(x0))
    assert m["reward_term"].item() == pytest.approx(-100.0 * reward.mean().item(), rel=1e-5)


def test_fake_score_loss_detaches_generator_and_uses_no_cfg():
    gen, teacher, z, noise, t = _toy_setup()
    fake = ToyEps(2)
    calls = []

    def fake_fn(x_t, tt):
        calls.append(x_t.requires_grad)
        return _fake_fn(fake)(x_t, tt)

    ac = _sdxl_alphas_cumprod()
    x0 = gen(z)
    loss, _ = di_star_fake_score_loss(x0, noise, t, ac, fake_fn)
    loss.backward()
    assert len(calls) == 1 and calls[0] is False  # one conditional call on a detached input
    assert all(p.grad is None for p in gen.parameters())
    assert fake.conv.weight.grad.abs().sum() > 0
    with torch.no_grad():
        expected = ((_fake_fn(fake)(noisy_sample(x0, noise, t, ac), t) - noise) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_out_cfg_equals_in_cfg_at_omega_one_and_gradient_at_omega_three():
    gen, teacher, z, noise, t = _toy_setup()
    fake = ToyEps(2).requires_grad_(False)
    ac = _sdxl_alphas_cumprod()
    grads = {}
    for place in ("in", "out"):
        gen.zero_grad()
        loss, _ = di_star_generator_loss(gen(z), noise, t, ac, _fake_fn(fake), _teacher_fn(teacher),
                                         guidance_scale=1.0, cfg_placement=place)
        loss.backward()
        grads[place] = (loss.item(), gen.weight.grad.clone())
    assert grads["in"][0] == grads["out"][0]
    torch.testing.assert_close(grads["in"][1], grads["out"][1])
    # Out-CFG with ω = 3, fake ≡ conditional teacher: only L_cfg = (ω−1)·⟨sg[ε_c − ε_∅], x_t⟩ has a gradient,
    # d/dx0 = (ω − 1)·a_t·sg[ε_c − ε_∅]/B.
    x0 = torch.randn(2, 3, 4, 4, requires_grad=True)
    n = torch.randn_like(x0)
    tt = torch.tensor([100, 700])
    cond = lambda x, _t: 0.5 * x
    uncond = lambda x, _t: 0.2 * x + 1.0
    loss, m = di_star_generator_loss(x0, n, tt, ac, cond, lambda x, _t: (uncond(x, _t), cond(x, _t)),
                                     guidance_scale=3.0, cfg_placement="out")
    loss.backward()
    a = ac[tt].sqrt().float().view(-1, 1, 1, 1)
    x_t = noisy_sample(x0.detach(), n, tt, ac)
    torch.testing.assert_close(x0.grad, 2.0 * a * (0.3 * x_t - 1.0) / 2, rtol=1e-4, atol=1e-5)
    assert m["div_loss"].item() == 0.0


def test_cfg_helper_and_convention():
    eu, ec = torch.tensor([1.0]), torch.tensor([3.0])
    assert teacher_cfg(eu, ec, 7.5).item() == pytest.approx(1 + 7.5 * 2)
    assert teacher_cfg(eu, ec, 7.5, "omega_minus_one").item() == pytest.approx(1 + 8.5 * 2)
    assert teacher_cfg(None, ec, 1.0).item() == 3.0
    assert effective_guidance_scale(7.5, "omega_minus_one") == 8.5
    with pytest.raises(ValueError):
        teacher_cfg(None, ec, 2.0)
    with pytest.raises(ValueError):
        effective_guidance_scale(7.5, "cfg")
    gen, teacher, z, noise, t = _toy_setup()
    fake = ToyEps(2).requires_grad_(False)
    ac = _sdxl_alphas_cumprod()
    l1, _ = di_star_generator_loss(gen(z), noise, t, ac, _fake_fn(fake), _teacher_fn(teacher))
    l2, _ = di_star_generator_loss(gen(z), noise, t, ac, _fake_fn(fake), _teacher_fn(teacher),
                                   cfg_convention="omega_minus_one")
    assert l1.item() != pytest.approx(l2.item())


def test_timestep_sampling_and_validation():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(10000, generator=g)
    assert t.min().item() == 20 and t.max().item() == 979  # randint(20, 980): exclusive top (SiD-LSG [code])
    ac = _sdxl_alphas_cumprod()
    with pytest.raises(ValueError):
        di_star_generator_loss(torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 3), torch.tensor([1, 2]), ac,
                               lambda x, t: x, lambda x, t: (x, x))
    with pytest.raises(ValueError):
        di_star_generator_loss(torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2), torch.tensor([1, 2000]), ac,
                               lambda x, t: x, lambda x, t: (x, x))
    with pytest.raises(ValueError):
        di_star_divergence(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), units="score", huber_c=1.0)
    with pytest.raises(ValueError):
        di_star_generator_loss(torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2), torch.tensor([1, 2]), ac,
                               lambda x, t: x, lambda x, t: (x, x), reward=torch.zeros(3))


def test_timesteps_exclusive_top_as_sid_lsg():
    # Issue 14 item 11: SiD-LSG draws torch.randint(tmin, tmax) — t_max itself is never drawn (fails on t_max + 1).
    t = sample_timesteps(2000, 5, 7, generator=torch.Generator().manual_seed(0))
    assert set(t.tolist()) == {5, 6}
    assert sample_timesteps(50, 5, 6).eq(5).all()
    with pytest.raises(ValueError, match="t_min < t_max"):
        sample_timesteps(4, 6, 6)
    with pytest.raises(ValueError, match="t_min"):
        DiffInstructStar.Config(t_min=980, t_max=980)
    assert DiffInstructStar.Config(t_min=0, t_max=1000).t_max == 1000  # t ≤ 999 is drawn from a 1000-step schedule
