"""Tests for genalign.objectives.r0 (card: /work/shared/methods/r0.md §8)."""

import pytest
import torch

from genalign.objectives.r0 import (
    R0,
    composite_reward,
    langevin_perturb_,
    lora_delta_regularizer,
    normalize_rewards,
    r0_generator_loss,
    resolve_step_weights,
    sample_eta,
    weight_regularizer,
)
from genalign.pipelines.rollout import ddim_random_eta_step, flow_predictions_from_velocity, flow_random_eta_step
from genalign.pipelines.rollout import flow_rollout as rollout


def test_config_defaults():
    cfg = R0.Config()
    assert cfg.num_steps == 4 and cfg.eta_range == (0.0, 1.0) and cfg.weight_reg == 1e-3
    assert cfg.step_weights == "final" and cfg.normalization == "batch"


# ------------------------------------------------------------------ random-η step


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_random_eta_step_marginal(eta):
    # fixed x0, true ε: x_{t'} ~ N((1 − t')x0, t'²) for every η (1e5 samples, tol 1e-2).
    g = torch.Generator().manual_seed(0)
    n, t_next = 100_000, 0.6
    x0 = torch.full((n, 1), 1.5)
    eps = torch.randn(n, 1, generator=g)
    xi = torch.randn(n, 1, generator=g)
    x = flow_random_eta_step(x0, eps, t_next, eta, xi)
    assert x.mean().item() == pytest.approx((1 - t_next) * 1.5, abs=1e-2)
    assert x.std().item() == pytest.approx(t_next, abs=1e-2)


def test_eta_zero_is_the_euler_step_of_the_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(4)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    v = torch.randn_like(x)
    t, t_next = sched.sigmas[1].item(), sched.sigmas[2].item()
    sched._step_index = 1  # step from sigmas[1] to sigmas[2]
    expected = sched.step(v, sched.timesteps[1], x).prev_sample
    x0_hat, eps_hat = flow_predictions_from_velocity(x, v, t)
    ours = flow_random_eta_step(x0_hat, eps_hat, t_next, 0.0)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, x + (t_next - t) * v, atol=1e-5, rtol=1e-5)


def test_ddim_eta_zero_matches_ddim_scheduler_and_eta_changes_result():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False)
    sched.set_timesteps(4)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    eps = torch.randn_like(x)
    t = int(sched.timesteps[1])
    t_prev = int(sched.timesteps[2])
    ab, abn = sched.alphas_cumprod[t], sched.alphas_cumprod[t_prev]
    expected = sched.step(eps, t, x, eta=0.0).prev_sample
    x0_hat = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
    ours = ddim_random_eta_step(x0_hat, eps, ab, abn, 0.0)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    xi = torch.randn_like(x)
    assert not torch.allclose(ddim_random_eta_step(x0_hat, eps, ab, abn, 0.5, xi), ours)
    # η = 1 with the scheduler's own variance: σ matches DDIMScheduler._get_variance
    sig = (1.0 * ((1 - abn) / (1 - ab)).sqrt() * (1 - ab / abn).sqrt())
    torch.testing.assert_close(sig**2, sched._get_variance(t, t_prev), rtol=1e-4, atol=1e-7)


def test_sample_eta_range_option():
    g = torch.Generator().manual_seed(0)
    e = sample_eta(1000, generator=g)
    assert 0.0 <= e.min() and e.max() <= 1.0 and e.std() > 0.2
    e2 = sample_eta(1000, (0.2, 0.3), generator=g)
    assert e2.min() >= 0.2 and e2.max() <= 0.3
    with pytest.raises(ValueError):
        sample_eta(4, (0.5, 1.5))


# ------------------------------------------------------------------ composite reward


def test_composite_reward_affine_invariance_and_gradient():
    torch.manual_seed(0)
    r1 = torch.randn(6, requires_grad=True)
    r2 = torch.randn(6) * 10
    R, _ = composite_reward({"a": r1, "b": r2}, {"a": 1.0, "b": 2.0})
    R_aff, _ = composite_reward({"a": 3.0 * r1 + 7.0, "b": 0.5 * r2 - 4.0}, {"a": 1.0, "b": 2.0})
    torch.testing.assert_close(R, R_aff, atol=1e-5, rtol=1e-5)
    # ∂R_b/∂r_a,b = w_a/σ_a (detached statistics ⇒ diagonal Jacobian, no cross-sample terms)
    sigma = r1.detach().std(unbiased=False)
    (grad_row,) = torch.autograd.grad(R[2], r1)
    expected = torch.zeros(6)
    expected[2] = 1.0 / (sigma + 1e-6)
    torch.testing.assert_close(grad_row, expected)


def test_normalization_options_change_result():
    r = torch.tensor([1.0, 2.0, 4.0])
    batch = normalize_rewards(r)
    assert batch.mean().abs() < 1e-6 and batch.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(normalize_rewards(r, "none"), r)
    torch.testing.assert_close(normalize_rewards(r, "fixed", (1.0, 2.0)), (r - 1.0) / (2.0 + 1e-6))
    assert not torch.allclose(normalize_rewards(r, eps=1.0), batch)
    with pytest.raises(ValueError):
        normalize_rewards(r, "fixed")
    with pytest.raises(ValueError):
        normalize_rewards(r, "zscore")


def test_equal_weights_default_and_zero_weights_error():
    r1, r2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([5.0, 3.0, 4.0])
    R, m = composite_reward({"a": r1, "b": r2})
    torch.testing.assert_close(R, 0.5 * normalize_rewards(r1) + 0.5 * normalize_rewards(r2))
    assert m["reward/a"].item() == pytest.approx(1.0)
    R_w, _ = composite_reward({"a": r1, "b": r2}, {"a": 1.0, "b": 0.0})
    assert not torch.allclose(R, R_w)
    with pytest.raises(ValueError):
        composite_reward({"a": r1, "b": r2}, {"a": 0.0, "b": 0.0})
    with pytest.raises(ValueError):
        composite_reward({"a": r1}, {"c": 1.0})
    with pytest.raises(ValueError):
        composite_reward({"a": r1, "b": torch.zeros(4)})


# ------------------------------------------------------------------ weight regulariser


def test_weight_regulariser_value_and_gradient():
    theta0 = [torch.randn(3, 4), torch.randn(5)]
    theta = [p.clone().requires_grad_(True) for p in theta0]
    reg = weight_regularizer(theta, theta0, 0.1)
    assert reg.item() == 0.0
    with torch.no_grad():
        theta[0].add_(1.0)
    reg = weight_regularizer(theta, theta0, 0.1)
    assert reg.item() == pytest.approx(0.1 * 12, rel=1e-6)
    reg.backward()
    torch.testing.assert_close(theta[0].grad, 2 * 0.1 * (theta[0].detach() - theta0[0]))
    torch.testing.assert_close(theta[1].grad, torch.zeros(5))


def test_lora_regulariser_is_merged_delta():
    torch.manual_seed(0)
    A, B = torch.randn(2, 6), torch.randn(5, 2)
    reg = lora_delta_regularizer([(A, B, 16 / 2)], lam=0.01)
    assert reg.item() == pytest.approx(0.01 * ((8.0 * B @ A) ** 2).sum().item(), rel=1e-5)
    assert reg.item() != pytest.approx(0.01 * ((A**2).sum() + (B**2).sum()).item(), rel=1e-2)
    with pytest.raises(ValueError):
        lora_delta_regularizer([(A, torch.randn(5, 3), 1.0)])


def test_lambda_infinity_keeps_parameters_at_theta0():
    # minimising −R + λ‖θ − θ0‖² with a huge λ: the minimiser is θ0 + O(1/λ) (θ stays at θ0); with λ = 0 the
    # same updates move θ away.
    theta0 = torch.tensor([0.5, -1.0])
    M = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])

    def run(lam, lr, steps=200):
        th = theta0.clone().requires_grad_(True)
        for _ in range(steps):
            th.grad = None
            loss, _ = r0_generator_loss([{"a": M @ th}], normalization="none",
                                        params=[th], init_params=[theta0], weight_reg=lam)
            loss.backward()
            with torch.no_grad():
                th -= lr * th.grad
        return th.detach()

    torch.testing.assert_close(run(1e6, 1e-7), theta0, atol=1e-5, rtol=0)
    assert (run(0.0, 1e-2) - theta0).abs().max() > 0.1


# ------------------------------------------------------------------ step weights & loss


def test_step_weights():
    assert resolve_step_weights("final", 4) == [0, 0, 0, 1]
    assert resolve_step_weights("uniform", 4) == [0.25] * 4
    assert resolve_step_weights([0, 1, 0, 1], 4) == [0, 1, 0, 1]
    with pytest.raises(ValueError):
        resolve_step_weights([1, 2], 4)


def test_r0_vs_r0plus_use_final_vs_all_steps():
    torch.manual_seed(0)
    steps = [{"a": torch.randn(4, requires_grad=True), "b": torch.randn(4)} for _ in range(4)]
    loss_final, _ = r0_generator_loss(steps)
    loss_final.backward()
    assert all(s["a"].grad is None for s in steps[:3]) and steps[3]["a"].grad is not None
    for s in steps:
        s["a"].grad = None
    loss_all, m = r0_generator_loss(steps, step_weights="uniform")
    loss_all.backward()
    assert all(s["a"].grad is not None and s["a"].grad.abs().sum() > 0 for s in steps)
    assert "reward_step0" in m and "reward_step3" in m
    # with batch standardisation the composite has zero mean, so the value is 0 but the gradient is not
    assert abs(loss_final.item()) < 1e-6
    # plain R0 may pass only the final rewards
    loss_one, _ = r0_generator_loss([{"a": steps[3]["a"], "b": steps[3]["b"]}])
    assert loss_one.item() == pytest.approx(loss_final.item(), abs=1e-7)
    with pytest.raises(ValueError):
        r0_generator_loss([{}, {}], step_weights="uniform")


def test_r0_loss_hand_value_without_normalisation():
    r = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([2.0, 2.0])}
    theta0 = torch.zeros(2)
    theta = torch.tensor([1.0, 2.0])
    loss, m = r0_generator_loss([r], reward_weights={"a": 2.0, "b": 1.0}, normalization="none",
                                params=[theta], init_params=[theta0], weight_reg=0.5)
    # −(2·mean(a) + 1·mean(b)) + 0.5·(1 + 4) = −(4 + 2) + 2.5 = −3.5
    assert loss.item() == pytest.approx(-3.5)
    assert m["weight_reg"].item() == pytest.approx(2.5)
    loss2, _ = r0_generator_loss([r], reward_weights={"a": 2.0, "b": 1.0}, normalization="none",
                                 regularizer=torch.tensor(1.0))
    assert loss2.item() == pytest.approx(-5.0)


# ------------------------------------------------------------------ rollout


def _toy_predict(theta):
    def predict(x, t, k):
        v = theta * x  # toy velocity network
        return flow_predictions_from_velocity(x, v, t)

    return predict


def test_rollout_gradient_reaches_first_step_and_backprop_steps():
    times = [1.0, 0.75, 0.5, 0.25]
    z = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    theta = torch.tensor(0.3, requires_grad=True)
    outs = rollout(_toy_predict(theta), z, times, eta=0.0)
    assert len(outs) == 4
    # gradient through the first step only: differentiate x̂0^(0)
    (g0,) = torch.autograd.grad(outs[0].sum(), theta, retain_graph=True)
    assert g0.abs() > 0
    (g_full,) = torch.autograd.grad(outs[-1].sum(), theta)
    # backprop_steps = 1: equals the gradient with the state entering the last step treated as a constant
    outs1 = rollout(_toy_predict(theta), z, times, eta=0.0, backprop_steps=1)
    (g1,) = torch.autograd.grad(outs1[-1].sum(), theta)
    x_last = None
    with torch.no_grad():
        x = z.clone()
        for k, t in enumerate(times[:-1]):
            x0, e = _toy_predict(theta)(x, t, k)
            x = flow_random_eta_step(x0, e, times[k + 1], 0.0)
        x_last = x
    x0_last, _ = _toy_predict(theta)(x_last, times[-1], 3)
    (g_ref,) = torch.autograd.grad(x0_last.sum(), theta)
    torch.testing.assert_close(g1, g_ref)
    assert not torch.allclose(g1, g_full)
    # deterministic at η = 0; stochastic at η > 0
    o_a = rollout(_toy_predict(theta), z, times, eta=0.5, generator=torch.Generator().manual_seed(1))
    o_b = rollout(_toy_predict(theta), z, times, eta=0.5, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(o_a[-1], o_b[-1])
    with pytest.raises(ValueError):
        rollout(_toy_predict(theta), z, [0.5, 0.75])


def test_langevin_perturbation():
    p = torch.zeros(1000)
    langevin_perturb_([p], lr=0.01, tau=0.0)
    assert torch.all(p == 0)
    langevin_perturb_([p], lr=0.01, tau=2.0, generator=torch.Generator().manual_seed(0))
    assert p.std().item() == pytest.approx((2 * 0.01 * 2.0) ** 0.5, rel=0.1)
