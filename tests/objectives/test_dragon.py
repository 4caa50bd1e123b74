"""Tests for genalign.objectives.dragon (card: /work/shared/methods/dragon.md §8)."""

import importlib.util
import math

import pytest
import torch

from genalign.evaluation.demonstrations import (
    build_paired_best_worst,
    build_unpaired_leave_one_out,
    build_unpaired_threshold,
    greedy_pairwise_split,
    leave_one_out_contributions,
)
from genalign.evaluation.winrate import subset_bootstrap_preference as set_win_rate_bootstrap
from genalign.evaluation.winrate import win_rate
from genalign.objectives.dragon import DRAGON, diffusion_kto_loss
from genalign.pipelines.audio import cosine_v_objective
from genalign.pipelines.audio import cosine_x0_from_v as x0_from_v


def test_config_defaults():
    cfg = DRAGON.Config()  # the one config (the unused DRAGONConfig dataclass is gone, issue 14 item 15)
    assert cfg.beta_kto == 1000.0 and cfg.beta_dpo == 5000.0
    assert cfg.lambda_desirable == cfg.lambda_undesirable == 1.0
    assert cfg.unpaired_threshold == "median"


# ---------------------------------------------------------------- KTO


def test_kto_init_is_half():
    # policy ≡ reference ⇒ g = 0, z_ref = 0, h = ½, loss = ½·mean λ = 0.5.
    L = torch.tensor([0.1, 0.2, 0.3, 0.4])
    loss, m = diffusion_kto_loss(L, L.clone(), torch.tensor([1, 0, 1, 0]), beta=1000.0)
    assert loss.item() == pytest.approx(0.5, abs=1e-7)
    assert m["kl"].item() == 0.0
    # with unequal λ: ½·mean(λ_y) = ½·(2 + 1 + 2 + 1)/4 = 0.75
    loss2, _ = diffusion_kto_loss(L, L.clone(), torch.tensor([1, 0, 1, 0]), 1000.0, 2.0, 1.0)
    assert loss2.item() == pytest.approx(0.75, abs=1e-7)


def test_kto_hand_value_and_gradient_signs():
    # β = 1000, L = [0.100, 0.101], R = [0.1005, 0.1005], labels [D+, D−] ⇒ g = [5e-4, −5e-4], z_ref = 0,
    # loss = 1 − σ(0.5) = 0.3775407.
    L = torch.tensor([0.100, 0.101], requires_grad=True)
    R = torch.tensor([0.1005, 0.1005], requires_grad=True)
    loss, m = diffusion_kto_loss(L, R, torch.tensor([True, False]), beta=1000.0)
    assert loss.item() == pytest.approx(0.3775407, abs=1e-5)
    assert m["kl"].item() == 0.0  # mean g = 0 → clamp gives 0
    loss.backward()
    # ∂/∂L_i = mean-weight·β·σ'(·)·s_i: desirable samples are pushed to LOWER L, undesirable to RAISE it.
    s = torch.sigmoid(torch.tensor(0.5))
    expected = 0.5 * 1000.0 * s * (1 - s)
    assert L.grad[0].item() == pytest.approx(expected.item(), rel=1e-3)
    assert L.grad[1].item() == pytest.approx(-expected.item(), rel=1e-3)
    assert R.grad is None  # reference losses are constants


def test_kto_reference_point_clamped_and_detached_and_verbatim():
    # mean g < 0 ⇒ z_ref = 0 (clamped); mean g > 0 ⇒ z_ref = mean g, no gradient through it.
    L = torch.tensor([0.2, 0.3], requires_grad=True)
    R = torch.tensor([0.1, 0.1])
    _, m = diffusion_kto_loss(L, R, torch.tensor([1, 0]), beta=10.0)
    assert m["kl"].item() == 0.0
    L2 = torch.tensor([0.1, 0.1], requires_grad=True)
    R2 = torch.tensor([0.3, 0.2])
    loss, m2 = diffusion_kto_loss(L2, R2, torch.tensor([1, 1]), beta=10.0)
    assert m2["kl"].item() == pytest.approx(0.15)
    loss.backward()
    # If z_ref were not detached the gradients of a batch of two desirable samples would include −mean terms;
    # check against the detached analytic gradient: ∂/∂L_i = ½·β·σ'(β(g_i − z)).
    g = R2 - L2.detach()
    z = g - 0.15
    sp = torch.sigmoid(10 * z) * (1 - torch.sigmoid(10 * z))
    torch.testing.assert_close(L2.grad, 0.5 * 10 * sp)
    # kl given ⇒ used verbatim (and it changes the loss)
    l_v, m_v = diffusion_kto_loss(L2.detach(), R2, torch.tensor([1, 1]), beta=10.0, kl=0.05)
    assert m_v["kl"].item() == pytest.approx(0.05)
    assert l_v.item() != pytest.approx(loss.item())
    # reduce_fn is applied before the clamp (e.g. a global all-reduce)
    _, m_r = diffusion_kto_loss(L2.detach(), R2, torch.tensor([1, 1]), beta=10.0, reduce_fn=lambda x: x * 0 - 1)
    assert m_r["kl"].item() == 0.0


def test_kto_lambdas_and_beta_change_result():
    L = torch.tensor([0.100, 0.101])
    R = torch.tensor([0.1005, 0.1005])
    lab = torch.tensor([1, 0])
    base = diffusion_kto_loss(L, R, lab)[0].item()
    assert diffusion_kto_loss(L, R, lab, lambda_desirable=2.0)[0].item() != pytest.approx(base)
    assert diffusion_kto_loss(L, R, lab, lambda_undesirable=0.0)[0].item() != pytest.approx(base)
    assert diffusion_kto_loss(L, R, lab, beta=500.0)[0].item() != pytest.approx(base)


def test_kto_validation():
    with pytest.raises(ValueError):
        diffusion_kto_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError):
        diffusion_kto_loss(torch.zeros(2), torch.zeros(2), torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError):
        diffusion_kto_loss(torch.zeros(2), torch.zeros(2), torch.tensor([0, 1]), beta=0.0)


def test_dpo_branch_if_available():
    if importlib.util.find_spec("genalign.objectives.dpo") is None:
        pytest.skip("genalign.objectives.dpo not written yet")
    from genalign.objectives.dragon import dragon_dpo_loss

    # diffusion_dpo.md §8: β = 5000, L_w = 0.1000, L_l = 0.1004, R_w = R_l = 0.1 ⇒ z = 1, loss = 0.3132617.
    loss, _ = dragon_dpo_loss(torch.tensor([0.1]), torch.tensor([0.1004]), torch.tensor([0.1]), torch.tensor([0.1]))
    assert loss.item() == pytest.approx(0.3132617, abs=1e-4)


def test_dragon_dpo_loss_equals_diffusion_dpo_loss():
    # DRAGON's paired branch is Diffusion-DPO; objectives do not import each other, so the formula is pinned here.
    from genalign.objectives.dpo import diffusion_dpo_loss
    from genalign.objectives.dragon import dragon_dpo_loss

    g = torch.Generator().manual_seed(0)
    lw, ll, rw, rl = (0.1 + 0.01 * torch.rand(6, generator=g) for _ in range(4))
    for half in (True, False):
        a, ma = dragon_dpo_loss(lw, ll, rw, rl, beta=3000.0, half_factor=half)
        b, mb = diffusion_dpo_loss(lw, ll, rw, rl, beta=3000.0, half_factor=half)
        assert a.item() == pytest.approx(b.item(), abs=1e-7)
        assert float(ma["implicit_acc"]) == pytest.approx(mb["implicit_acc"])
    with pytest.raises(ValueError):
        dragon_dpo_loss(lw, ll, rw, rl[:3])


# ---------------------------------------------------------------- builders


def test_best_worst_pairing_and_ties():
    r = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.3, 0.3], [2.0, -1.0, 0.0]])
    d = build_paired_best_worst(r)
    assert d.prompt_index.tolist() == [0, 2]
    assert d.chosen_index.tolist() == [0 * 3 + 1, 2 * 3 + 0]
    assert d.rejected_index.tolist() == [0 * 3 + 0, 2 * 3 + 1]
    assert d.num_dropped == 1
    # tie_tol (reconstruction option) changes which prompts are dropped
    d2 = build_paired_best_worst(r, tie_tol=1.0)
    assert d2.prompt_index.tolist() == [2] and d2.num_dropped == 2
    with pytest.raises(ValueError):
        build_paired_best_worst(torch.zeros(3, 1))


def test_unpaired_threshold_options():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0])
    assert build_unpaired_threshold(r).tolist() == [False, False, True, True]  # median (lower) = 2
    assert build_unpaired_threshold(r, "mean").tolist() == [False, False, False, True]  # mean = 4
    assert build_unpaired_threshold(r, 0.5).tolist() == [True] * 4
    with pytest.raises(ValueError):
        build_unpaired_threshold(r, "max")


def _neg_mean_dist(mu_ref):
    # a simple set reward: −‖mean(D) − μ_ref‖² (higher is better)
    return lambda x: -float(((x.mean(0) - mu_ref) ** 2).sum())


def test_greedy_split_never_decreases_set_reward():
    torch.manual_seed(0)
    a = torch.randn(12, 3)
    b = torch.randn(12, 3) + 0.5
    mu_ref = torch.tensor([0.4, 0.4, 0.4])
    fn = _neg_mean_dist(mu_ref)
    a_pos, trace = greedy_pairwise_split(a, b, fn)
    assert all(t2 >= t1 for t1, t2 in zip(trace, trace[1:]))
    final = torch.where(a_pos.view(-1, 1), a, b)
    assert fn(final) == pytest.approx(trace[-1])
    assert trace[-1] >= fn(a)
    assert trace[-1] > fn(a)  # this configuration does make swaps
    assert (~a_pos).any()


def test_leave_one_out_lowest_credit_for_outlier():
    torch.manual_seed(0)
    mu_ref = torch.zeros(4)
    items = 0.1 * torch.randn(10, 4)
    items[6] = torch.full((4,), 8.0)  # far from the reference statistics
    c = leave_one_out_contributions(items, _neg_mean_dist(mu_ref))
    assert int(c.argmin()) == 6 and c[6] < 0
    # c_i = r(D) − r(D∖i) checked by hand for one index
    fn = _neg_mean_dist(mu_ref)
    assert c[2].item() == pytest.approx(fn(items) - fn(torch.cat([items[:2], items[3:]])))
    labels, c2 = build_unpaired_leave_one_out(items, fn)
    assert not labels[6] and labels.sum() == 5  # strictly above the (lower) median of 10 values → 5
    torch.testing.assert_close(c, c2)
    labels_mean, _ = build_unpaired_leave_one_out(items, fn, threshold="mean")
    assert not torch.equal(labels, labels_mean)  # the threshold option changes the split


# ---------------------------------------------------------------- win rate


def test_win_rate_ties_half_and_identical_models():
    assert win_rate(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 2.0, 5.0, 1.0])) == pytest.approx(
        (1 + 0.5 + 0 + 1) / 4
    )
    x = torch.randn(20)
    assert win_rate(x, x.clone()) == 0.5
    assert win_rate(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]), tie_value=0.0) == 0.0
    assert win_rate(torch.tensor([1.0]), torch.tensor([0.95]), tie_tol=0.1) == 0.5
    with pytest.raises(ValueError):
        win_rate(torch.zeros(2), torch.zeros(3))


def test_set_win_rate_bootstrap():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 3) + 2.0
    new = torch.randn(40, 3) * 0.1
    fn = _neg_mean_dist(torch.zeros(3))
    assert set_win_rate_bootstrap(new, base, fn, num_subsets=20, generator=g) == 1.0
    assert set_win_rate_bootstrap(base, base.clone(), fn, num_subsets=5, generator=g) == 0.5


# ---------------------------------------------------------------- v-objective plumbing


def test_v_target_plumbing():
    torch.manual_seed(0)
    x0 = torch.randn(3, 64, 16)
    eps = torch.randn_like(x0)
    t = torch.tensor([0.0, 0.3, 0.99])
    x_t, v = cosine_v_objective(x0, eps, t)
    a = torch.cos(math.pi * t / 2).view(-1, 1, 1)
    s = torch.sin(math.pi * t / 2).view(-1, 1, 1)
    torch.testing.assert_close(v, a * eps - s * x0)
    assert ((v - v) ** 2).mean().item() == 0.0  # v̂ = v ⇒ zero loss
    torch.testing.assert_close(x0_from_v(x_t, v, t), x0, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        cosine_v_objective(x0, eps, torch.tensor([0.0, 0.3, 1.5]))
