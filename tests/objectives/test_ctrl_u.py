"""Tests for genalign.objectives.ctrl_u (card: /work/shared/methods/ctrl_u.md §8)."""

import math

import pytest
import torch

from genalign.objectives.ctrl_u import (
    CtrlU,
    controlnet_pp_reward_loss,
    ctrl_u_reward_terms,
    lambda_ramp,
    make_timestep_pair,
    pair_rows,
)
from genalign.pipelines.schedule import alpha_bar_at
from genalign.pipelines.schedule import x0_from_epsilon as _x0_from_epsilon
from genalign.rewards.condition import normalize_depth_by_max


def x0_from_epsilon(z_t, eps, t, alphas_cumprod):
    """ẑ0 at integer timesteps t of the schedule (the pipelines' closed form used by the ControlNet adapter)."""
    return _x0_from_epsilon(z_t, eps, alpha_bar_at(alphas_cumprod, t))


def _seg_hand(u_scale):
    primary = torch.tensor([2.0, 0.0]).view(1, 2, 1, 1)
    aux = torch.tensor([0.0, 0.0]).view(1, 2, 1, 1)
    label = torch.zeros(1, 1, 1, dtype=torch.long)
    return ctrl_u_reward_terms(primary, aux, label, torch.tensor([10]), "segmentation", 0, 400, u_scale)


def test_config_runs():
    assert CtrlU.Config.for_run("ade20k").grad_scale == 0.1 and CtrlU.Config.for_run("ade20k").u_scale == 1.0
    assert CtrlU.Config.for_run("cocostuff").t_max == 200
    assert CtrlU.Config.for_run("hed").lambda_ramp_steps is None
    with pytest.raises(ValueError):
        CtrlU.Config.for_run("canny")


def test_segmentation_hand_case():
    # primary logits (2, 0), aux (0, 0), label 0 ⇒ KL(aux‖primary) = 0.4337808, CE = 0.1269280.
    r, reg, U = _seg_hand(1.0)
    assert U.item() == pytest.approx(0.4337808, abs=1e-6)
    assert r.item() == pytest.approx(0.0822562, abs=1e-6)  # 0.1269280·e^(−0.4337808)
    assert reg.item() == pytest.approx(0.4337808, abs=1e-6)
    r, reg, U = _seg_hand(0.1)
    assert r.item() == pytest.approx(0.1215398, abs=1e-6)  # u_scale inside the exponent for segmentation
    assert reg.item() == pytest.approx(0.0433781, abs=1e-6)
    r_pp, _ = controlnet_pp_reward_loss(
        torch.tensor([2.0, 0.0]).view(1, 2, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long), torch.tensor([10]),
        "segmentation", 0, 400,
    )
    assert r_pp.item() == pytest.approx(0.1269280, abs=1e-6)


def test_depth_hand_case():
    # primary 0.5, auxiliary 0.3, target 0.6, u_scale 0.1 ⇒ U = 0.2, R = 0.01·e^(−0.2) = 0.0081873, reg = 0.02.
    p = torch.full((1, 2, 2), 0.5)
    a = torch.full((1, 2, 2), 0.3)
    tgt = torch.full((1, 2, 2), 0.6)
    r, reg, U = ctrl_u_reward_terms(p, a, tgt, torch.tensor([100]), "depth", 0, 400, 0.1)
    torch.testing.assert_close(U, torch.full((1, 2, 2), 0.2))
    assert r.item() == pytest.approx(0.0081873, abs=1e-6)
    assert reg.item() == pytest.approx(0.02, abs=1e-7)


def test_options_change_result():
    # u_scale_in_exponent and reg_scale are config fields: flipping them changes the computation.
    p = torch.full((1, 2, 2), 0.5)
    a = torch.full((1, 2, 2), 0.3)
    tgt = torch.full((1, 2, 2), 0.6)
    r, reg, _ = ctrl_u_reward_terms(p, a, tgt, torch.tensor([100]), "depth", 0, 400, 0.1, u_scale_in_exponent=True)
    assert r.item() == pytest.approx(0.01 * math.exp(-0.02), abs=1e-7)
    assert reg.item() == pytest.approx(0.02, abs=1e-7)  # reg_scale defaults to 1 with U = 0.02
    _, reg2, _ = ctrl_u_reward_terms(p, a, tgt, torch.tensor([100]), "depth", 0, 400, 0.1, reg_scale=2.0)
    assert reg2.item() == pytest.approx(0.4, abs=1e-6)
    r3, _, _ = _seg_hand(1.0)
    r4, _, _ = ctrl_u_reward_terms(
        torch.tensor([2.0, 0.0]).view(1, 2, 1, 1), torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long),
        torch.tensor([10]), "segmentation", 0, 400, 1.0, u_scale_in_exponent=False,
    )
    assert r3.item() == pytest.approx(r4.item())  # u_scale = 1: no difference …
    r5, reg5, _ = ctrl_u_reward_terms(
        torch.tensor([2.0, 0.0]).view(1, 2, 1, 1), torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long),
        torch.tensor([10]), "segmentation", 0, 400, 0.1, u_scale_in_exponent=False,
    )
    assert r5.item() == pytest.approx(0.0822562, abs=1e-6)  # … u_scale = 0.1 outside the exponent
    assert reg5.item() == pytest.approx(0.0433781, abs=1e-6)


@pytest.mark.parametrize("task", ["segmentation", "depth", "hed", "lineart"])
def test_no_disagreement_reduces_to_controlnet_pp(task):
    torch.manual_seed(0)
    B = 3
    if task == "segmentation":
        pred = torch.randn(B, 5, 4, 4)
        tgt = torch.randint(0, 5, (B, 4, 4))
        tgt[0, 0, :] = 255
    elif task == "depth":
        pred = torch.rand(B, 4, 4)
        tgt = torch.rand(B, 4, 4)
    else:
        pred = torch.rand(B, 3, 4, 4)
        tgt = torch.rand(B, 3, 4, 4)
    t = torch.tensor([5, 500, 100])
    r, reg, U = ctrl_u_reward_terms(pred, pred.clone(), tgt, t, task, 0, 400, 0.1)
    r_pp, m = controlnet_pp_reward_loss(pred, tgt, t, task, 0, 400)
    assert torch.all(U.abs() < 1e-6) and abs(reg.item()) < 1e-7
    torch.testing.assert_close(r, r_pp)
    assert m["num_gated"].item() == 2


def test_kl_direction_is_aux_given_primary():
    torch.manual_seed(0)
    p = torch.randn(2, 4, 3, 3)
    a = torch.randn(2, 4, 3, 3)
    lab = torch.randint(0, 4, (2, 3, 3))
    t = torch.tensor([1, 2])
    _, _, U = ctrl_u_reward_terms(p, a, lab, t, "segmentation", 0, 400, 1.0)
    _, _, U_swapped = ctrl_u_reward_terms(a, p, lab, t, "segmentation", 0, 400, 1.0)
    pa, pp = torch.softmax(a, 1), torch.softmax(p, 1)
    expected = (pa * (pa.log() - pp.log())).sum(1)
    torch.testing.assert_close(U, expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(U, U_swapped)


def test_edge_uncertainty_uses_channel_zero_and_channel_mean_loss():
    p = torch.zeros(1, 2, 1, 1)
    a = torch.zeros(1, 2, 1, 1)
    a[0, 1] = 5.0  # disagreement only in channel 1 ⇒ U = 0
    tgt = torch.ones(1, 2, 1, 1)
    r, reg, U = ctrl_u_reward_terms(p, a, tgt, torch.tensor([0]), "hed", 0, 400, 0.1)
    assert U.item() == 0.0 and reg.item() == 0.0
    assert r.item() == pytest.approx(1.0)
    a[0, 0] = 0.5
    r, reg, U = ctrl_u_reward_terms(p, a, tgt, torch.tensor([0]), "lineart", 0, 400, 0.1)
    assert U.item() == pytest.approx(0.5)
    assert r.item() == pytest.approx(math.exp(-0.5), abs=1e-6)
    assert reg.item() == pytest.approx(0.05, abs=1e-7)


def test_gradient_reaches_auxiliary_branch():
    torch.manual_seed(0)
    for task, shape in (("segmentation", (2, 3, 4, 4)), ("depth", (2, 4, 4)), ("lineart", (2, 1, 4, 4))):
        p = torch.randn(*shape, requires_grad=True)
        a = torch.randn(*shape, requires_grad=True)
        tgt = torch.randint(0, 3, (2, 4, 4)) if task == "segmentation" else torch.rand(*shape)
        r, reg, _ = ctrl_u_reward_terms(p, a, tgt, torch.tensor([3, 4]), task, 0, 400, 0.1)
        (r + reg).backward()
        assert a.grad is not None and a.grad.abs().sum() > 0, task
        assert p.grad.abs().sum() > 0, task
        # the reward term alone also reaches aux (through exp(−U)), and the regulariser alone too
        a.grad = None
        r, reg, _ = ctrl_u_reward_terms(p, a, tgt, torch.tensor([3, 4]), task, 0, 400, 0.1)
        r.backward(retain_graph=True)
        assert a.grad.abs().sum() > 0, task


def test_timestep_gate():
    torch.manual_seed(0)
    p = torch.rand(3, 4, 4)
    a = torch.rand(3, 4, 4)
    tgt = torch.rand(3, 4, 4)
    r_all, reg_all, _ = ctrl_u_reward_terms(p, a, tgt, torch.tensor([400, 401, 0]), "depth", 0, 400, 0.1)
    r_sub, reg_sub, _ = ctrl_u_reward_terms(p[[0, 2]], a[[0, 2]], tgt[[0, 2]], torch.tensor([400, 0]), "depth", 0, 400, 0.1)
    torch.testing.assert_close(r_all, r_sub)  # t = 401 > t_max contributes exactly 0; t = t_max included
    torch.testing.assert_close(reg_all, reg_sub)
    p.requires_grad_(True)
    r0, reg0, _ = ctrl_u_reward_terms(p, a, tgt, torch.tensor([401, 999, 500]), "depth", 0, 400, 0.1)
    assert r0.item() == 0.0 and reg0.item() == 0.0 and not torch.isnan(r0)
    (r0 + reg0).backward()
    assert torch.all(p.grad == 0)
    # (2B,) paired timesteps: the primary half is used
    r_pair, _, _ = ctrl_u_reward_terms(
        p.detach(), a, tgt, make_timestep_pair(torch.tensor([400, 401, 0])), "depth", 0, 400, 0.1
    )
    torch.testing.assert_close(r_pair, r_all)


def test_ignore_index_in_reward_not_in_regulariser():
    p = torch.tensor([[2.0, 0.0], [0.0, 3.0]]).T.reshape(1, 2, 1, 2)  # pixel 0 logits (2,0); pixel 1 (0,3)
    a = torch.zeros(1, 2, 1, 2)
    lab = torch.tensor([[[0, 255]]])
    r, reg, U = ctrl_u_reward_terms(p, a, lab, torch.tensor([0]), "segmentation", 0, 400, 1.0)
    assert r.item() == pytest.approx(0.0822562, abs=1e-6)  # only pixel 0 counts (mean over 1 valid pixel)
    assert reg.item() == pytest.approx(U.mean().item(), abs=1e-7)  # both pixels in the regulariser
    assert U[0, 0, 1] > 0
    # all-ignored sample contributes 0 to the reward (no NaN)
    r2, _, _ = ctrl_u_reward_terms(p, a, torch.full((1, 1, 2), 255), torch.tensor([0]), "segmentation", 0, 400, 1.0)
    assert r2.item() == 0.0


def test_pairing_helpers():
    t = torch.tensor([0, 998, 999, 500])
    assert make_timestep_pair(t).tolist() == [0, 998, 999, 500, 1, 999, 999, 501]
    noise = torch.randn(4, 2, 3, 3)
    n2 = pair_rows(noise)
    assert torch.equal(n2[:4], n2[4:])


def test_lambda_ramp():
    assert lambda_ramp(0, 0.1) == 0.0
    assert lambda_ramp(2500, 0.1) == pytest.approx(0.05)
    assert lambda_ramp(5000, 0.1) == pytest.approx(0.1)
    assert lambda_ramp(10**6, 0.1) == pytest.approx(0.1)
    assert lambda_ramp(0, 1.0, None) == 1.0
    with pytest.raises(ValueError):
        lambda_ramp(-1, 1.0)


def test_x0_from_epsilon_matches_ddpm_scheduler():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
    torch.manual_seed(0)
    z = torch.randn(3, 4, 8, 8)
    eps = torch.randn_like(z)
    t = torch.tensor([0, 399, 999])
    ours = x0_from_epsilon(z, eps, t, sched.alphas_cumprod)
    ref = torch.stack(
        [sched.step(e, int(ti), zi).pred_original_sample for e, ti, zi in zip(eps, t, z)]
    )
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)
    # round trip with add_noise
    x0 = torch.randn_like(z)
    zt = sched.add_noise(x0, eps, t)
    torch.testing.assert_close(x0_from_epsilon(zt, eps, t, sched.alphas_cumprod), x0, atol=2e-3, rtol=1e-4)


def test_depth_normalisation_and_validation():
    d = torch.tensor([[[1.0, 2.0], [4.0, 0.0]]])
    torch.testing.assert_close(normalize_depth_by_max(d), d / 4)
    with pytest.raises(ValueError):
        ctrl_u_reward_terms(torch.zeros(1, 2, 2), torch.zeros(1, 2, 3), torch.zeros(1, 2, 2), torch.tensor([0]),
                            "depth", 0, 400, 0.1)
    with pytest.raises(ValueError):
        ctrl_u_reward_terms(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.tensor([0]),
                            "canny", 0, 400, 0.1)
    with pytest.raises(ValueError):  # labels at the wrong resolution
        ctrl_u_reward_terms(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), torch.zeros(1, 4, 4, dtype=torch.long),
                            torch.tensor([0]), "segmentation", 0, 400, 0.1)
    with pytest.raises(ValueError):  # label out of range
        ctrl_u_reward_terms(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), torch.full((1, 2, 2), 7),
                            torch.tensor([0]), "segmentation", 0, 400, 0.1)
    with pytest.raises(ValueError):
        ctrl_u_reward_terms(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.tensor([0, 1, 2]),
                            "depth", 0, 400, 0.1)


def test_fp16_inputs_are_upcast():
    p = torch.full((1, 2, 2), 0.5, dtype=torch.float16)
    a = torch.full((1, 2, 2), 0.3, dtype=torch.float16)
    r, reg, U = ctrl_u_reward_terms(p, a, torch.full((1, 2, 2), 0.6), torch.tensor([1]), "depth", 0, 400, 0.1)
    assert r.dtype == torch.float32 and U.dtype == torch.float32


def test_condition_reward_is_a_reward_member():
    # One config shape for reward members everywhere (issue 12): {name, kwargs}; a bare name still reads.
    c = CtrlU.Config(reward={"name": "upernet", "kwargs": {"palette": "ade20k"}})
    assert c.reward.name == "upernet" and c.reward.kwargs == {"palette": "ade20k"}
    assert CtrlU.Config(reward="soft_edges").reward.name == "soft_edges"
    assert CtrlU.Config().reward.name == "digit_stroke_mask"
    assert CtrlU.Config.for_run("ade20k").reward.kwargs["palette"] == "ade20k"
    with pytest.raises(ValueError, match="grad_scale"):
        CtrlU.Config(reward={"name": "upernet", "weight": 2.0})
    with pytest.raises(ValueError):
        CtrlU.Config(reward_kwargs={"palette": "ade20k"})  # the old second field is gone (extra keys are errors)
