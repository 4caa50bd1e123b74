"""Tests for genalign.objectives.ddo (card: /work/shared/methods/ddo.md §8)."""

import math

import pytest
import torch
import torch.nn.functional as F

from genalign.objectives.ddo import (
    DDO,
    convert_beta,
    ddo_loss,
    ddo_loss_from_log_ratios,
    edm_f_target,
    edm_preconditioning,
    per_sample_error,
)


def test_config_defaults():
    cfg = DDO.Config()  # the one config (the unused DDOConfig dataclass is gone, issue 14 item 15)
    assert (cfg.alpha, cfg.beta, cfg.reduction) == (4.0, 0.05, "sum")


def test_init_value_is_one_plus_alpha_ln2():
    # θ ≡ ref ⇒ Δ = 0 on both batches, loss = (1 + α)·ln 2 = 3.4657359 for α = 4, d = ½.
    L = torch.tensor([0.3, 0.7, 1.1])
    Lf = torch.tensor([0.2, 0.5])
    loss, m = ddo_loss(L, L.clone(), Lf, Lf.clone(), alpha=4.0, beta=0.05)
    assert loss.item() == pytest.approx(3.4657359, abs=1e-6)
    assert loss.item() == pytest.approx(5 * math.log(2), abs=1e-6)
    assert m["d_real"].item() == pytest.approx(0.5)
    assert m["d_fake"].item() == pytest.approx(0.5)


def test_hand_value():
    # α = 4, β = 0.05, Δ_real = 10, Δ_fake = −10 ⇒ −logσ(0.5) − 4·logσ(0.5) = 2.3703849.
    loss, m = ddo_loss_from_log_ratios(torch.tensor([10.0]), torch.tensor([-10.0]), alpha=4.0, beta=0.05)
    assert loss.item() == pytest.approx(2.3703849, abs=1e-6)
    assert m["d_real"].item() == pytest.approx(torch.sigmoid(torch.tensor(0.5)).item(), abs=1e-7)
    assert m["d_fake"].item() == pytest.approx(torch.sigmoid(torch.tensor(-0.5)).item(), abs=1e-7)
    # Same through the diffusion form: Δ = −(L_θ − L_ref): L_θ below ref on real by 10, above on fake by 10.
    loss2, _ = ddo_loss(
        torch.tensor([0.0]), torch.tensor([10.0]), torch.tensor([10.0]), torch.tensor([0.0]), alpha=4.0, beta=0.05
    )
    assert loss2.item() == pytest.approx(2.3703849, abs=1e-6)


def test_sign_of_delta_and_real_fake_asymmetry():
    # Wrong sign of Δ would give the larger value; swapping real/fake changes the loss (α weights the fake term).
    good, _ = ddo_loss(torch.tensor([0.0]), torch.tensor([10.0]), torch.tensor([10.0]), torch.tensor([0.0]))
    bad, _ = ddo_loss(torch.tensor([10.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([10.0]))
    assert good.item() < bad.item()
    expected_bad = -F.logsigmoid(torch.tensor(-0.5)) - 4 * F.logsigmoid(torch.tensor(-0.5))
    assert bad.item() == pytest.approx(expected_bad.item(), abs=1e-6)


def test_gradient_signs_and_values_at_init():
    # ∂L/∂Δ_real = −β/2 / B_real, ∂L/∂Δ_fake = +αβ/2 / B_fake at Δ = 0.
    alpha, beta = 4.0, 0.05
    dr = torch.zeros(3, requires_grad=True)
    df = torch.zeros(5, requires_grad=True)
    loss, _ = ddo_loss_from_log_ratios(dr, df, alpha=alpha, beta=beta)
    loss.backward()
    torch.testing.assert_close(dr.grad, torch.full((3,), -beta / 2 / 3))
    torch.testing.assert_close(df.grad, torch.full((5,), alpha * beta / 2 / 5))
    # Through the per-sample errors: real target errors are pushed down, fake target errors up;
    # reference errors get no gradient.
    lt_r = torch.ones(3, requires_grad=True)
    lr_r = torch.ones(3, requires_grad=True)
    lt_f = torch.ones(5, requires_grad=True)
    lr_f = torch.ones(5, requires_grad=True)
    loss, _ = ddo_loss(lt_r, lr_r, lt_f, lr_f, alpha=alpha, beta=beta)
    loss.backward()
    torch.testing.assert_close(lt_r.grad, torch.full((3,), beta / 2 / 3))
    torch.testing.assert_close(lt_f.grad, torch.full((5,), -alpha * beta / 2 / 5))
    assert lr_r.grad is None and lr_f.grad is None


def test_one_step_moves_model_losses_in_the_right_direction():
    # Tiny "network": per-sample error = (θ·x − y)² with a shared reference θ_ref = θ0.
    torch.manual_seed(0)
    theta = torch.tensor([0.5], requires_grad=True)
    x_real, y_real = torch.randn(8), torch.randn(8)
    x_fake, y_fake = torch.randn(8), torch.randn(8)

    def errs(th):
        return (th * x_real - y_real) ** 2, (th * x_fake - y_fake) ** 2

    ref_r, ref_f = errs(theta.detach())
    opt = torch.optim.SGD([theta], lr=1.0)
    lr_, lf_ = errs(theta)
    loss, _ = ddo_loss(lr_, ref_r, lf_, ref_f, alpha=4.0, beta=0.05)
    loss.backward()
    opt.step()
    with torch.no_grad():
        new_r, new_f = errs(theta)
        _, m = ddo_loss(new_r, ref_r, new_f, ref_f, alpha=4.0, beta=0.05)
    assert m["d_real"] > 0.5 or m["d_fake"] < 0.5  # the discriminator improves
    # first-order: mean(Δ_real) − α·mean(Δ_fake)·... the objective's linearisation decreases
    assert loss.item() > ddo_loss(new_r, ref_r, new_f, ref_f)[0].item()


def _optimise_discrete(p_data, p_ref, alpha, beta):
    """Minimise the exact expectations of Eq. 13 over free logits of p_θ on K = 5 outcomes (LBFGS)."""
    logits = torch.log(p_ref).double().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([logits], lr=1.0, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        r = torch.log_softmax(logits, 0) - torch.log(p_ref.double())
        loss, _ = ddo_loss_from_log_ratios(r, r, alpha=alpha, beta=beta, weights_real=p_data, weights_fake=p_ref)
        loss.backward()
        return loss

    opt.step(closure)
    return torch.softmax(logits.detach(), 0).float()


def test_theorem_3_1_alpha_beta_one_recovers_p_data():
    p_data = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15])
    p_ref = torch.tensor([0.3, 0.1, 0.2, 0.1, 0.3])
    p = _optimise_discrete(p_data, p_ref, alpha=1.0, beta=1.0)
    torch.testing.assert_close(p, p_data, atol=1e-3, rtol=0)


def test_theorem_3_3_tilt_at_alpha_star():
    p_data = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15])
    p_ref = torch.tensor([0.3, 0.1, 0.2, 0.1, 0.3])
    beta = 0.5
    tilt = p_ref ** (1 - 1 / beta) * p_data ** (1 / beta)
    alpha_star = tilt.sum().item() ** beta
    p = _optimise_discrete(p_data, p_ref, alpha=alpha_star, beta=beta)
    torch.testing.assert_close(p, tilt / tilt.sum(), atol=1e-3, rtol=0)


def test_stability_large_log_ratios():
    dr = torch.tensor([1e4, -1e4], requires_grad=True)
    df = torch.tensor([-1e4, 1e4], requires_grad=True)
    loss, _ = ddo_loss_from_log_ratios(dr, df, alpha=1.0, beta=1.0)
    loss.backward()
    assert torch.isfinite(loss)
    # −logσ(−1e4) = 1e4 for the misclassified real sample (÷2) and α·1e4/2 for the misclassified fake.
    assert loss.item() == pytest.approx(1e4, rel=1e-6)
    assert torch.isfinite(dr.grad).all() and torch.isfinite(df.grad).all()
    torch.testing.assert_close(dr.grad, torch.tensor([0.0, -0.5]))
    torch.testing.assert_close(df.grad, torch.tensor([0.0, 0.5]))


def test_edm_identity():
    torch.manual_seed(0)
    sigma = torch.tensor([0.02, 0.5, 3.0, 40.0])
    x0 = torch.randn(4, 3, 4, 4)
    x_t = x0 + sigma.view(-1, 1, 1, 1) * torch.randn_like(x0)
    F_theta = torch.randn_like(x0)
    c_skip, c_out, lam = edm_preconditioning(sigma)
    D_theta = c_skip.view(-1, 1, 1, 1) * x_t + c_out.view(-1, 1, 1, 1) * F_theta
    lhs = per_sample_error(F_theta, edm_f_target(x0, x_t, sigma))
    rhs = lam * per_sample_error(D_theta, x0)
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-4)


def test_reduction_bookkeeping_mean_at_beta_times_d_equals_sum_at_beta():
    torch.manual_seed(0)
    D = 2 * 4 * 4
    preds = [torch.randn(3, 2, 4, 4) for _ in range(4)]
    target_r = torch.randn(3, 2, 4, 4)
    target_f = torch.randn(3, 2, 4, 4)
    loss_sum, _ = ddo_loss(
        per_sample_error(preds[0], target_r, "sum"), per_sample_error(preds[1], target_r, "sum"),
        per_sample_error(preds[2], target_f, "sum"), per_sample_error(preds[3], target_f, "sum"),
        alpha=4.0, beta=0.05,
    )
    beta_mean = convert_beta(0.05, "sum", "mean", D)
    assert beta_mean == pytest.approx(0.05 * D)
    loss_mean, _ = ddo_loss(
        per_sample_error(preds[0], target_r, "mean"), per_sample_error(preds[1], target_r, "mean"),
        per_sample_error(preds[2], target_f, "mean"), per_sample_error(preds[3], target_f, "mean"),
        alpha=4.0, beta=beta_mean,
    )
    torch.testing.assert_close(loss_mean, loss_sum, rtol=1e-5, atol=1e-6)
    # ...whereas the same β with mean reduction is a different (much colder) objective.
    loss_mean_same_beta, _ = ddo_loss(
        per_sample_error(preds[0], target_r, "mean"), per_sample_error(preds[1], target_r, "mean"),
        per_sample_error(preds[2], target_f, "mean"), per_sample_error(preds[3], target_f, "mean"),
        alpha=4.0, beta=0.05,
    )
    assert abs(loss_mean_same_beta.item() - loss_sum.item()) > 1e-3
    assert convert_beta(819.2, "mean", "sum", 16384) == pytest.approx(0.05)
    assert convert_beta(0.05, "sum", "sum", 16384) == 0.05


def test_alpha_and_beta_change_the_result():
    dr, df = torch.tensor([3.0, -1.0]), torch.tensor([2.0, 0.5])
    base = ddo_loss_from_log_ratios(dr, df, alpha=4.0, beta=0.05)[0]
    assert ddo_loss_from_log_ratios(dr, df, alpha=2.0, beta=0.05)[0] != base
    assert ddo_loss_from_log_ratios(dr, df, alpha=4.0, beta=0.1)[0] != base


def test_weights_and_fp16_upcast():
    dr = torch.tensor([1.0, 2.0], dtype=torch.float16)
    df = torch.tensor([0.5], dtype=torch.float16)
    loss, _ = ddo_loss_from_log_ratios(dr, df, alpha=1.0, beta=1.0)
    assert loss.dtype == torch.float32
    w = torch.tensor([1.0, 0.0])
    lw, _ = ddo_loss_from_log_ratios(dr, df, alpha=1.0, beta=1.0, weights_real=w)
    expected = -F.logsigmoid(torch.tensor(1.0)) - F.logsigmoid(torch.tensor(-0.5))
    assert lw.item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [dict(alpha=0.0), dict(beta=-1.0), dict(alpha=float("nan"))],
)
def test_rejects_bad_hyperparameters(kwargs):
    args = dict(alpha=4.0, beta=0.05)
    args.update(kwargs)
    with pytest.raises(ValueError):
        ddo_loss_from_log_ratios(torch.zeros(2), torch.zeros(2), **args)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        ddo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError):
        ddo_loss(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError):
        ddo_loss_from_log_ratios(torch.zeros(0), torch.zeros(2))
    with pytest.raises(ValueError):
        per_sample_error(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        convert_beta(0.05, "sum", "median", 10)


def test_per_sample_error_weighting_option_changes_result():
    # w(t) is a [recon] option: it multiplies each sample's error (here w = [1, 2] on identical errors).
    pred, tgt = torch.ones(2, 3), torch.zeros(2, 3)
    torch.testing.assert_close(per_sample_error(pred, tgt), torch.tensor([3.0, 3.0]))
    torch.testing.assert_close(per_sample_error(pred, tgt, "mean"), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(per_sample_error(pred, tgt, weight=torch.tensor([1.0, 2.0])), torch.tensor([3.0, 6.0]))
