"""MaPO, Diffusion-DPO and SFT losses against hand-computed values, limits and gradients (method cards §8)."""

import math

import pytest
import torch

from genalign.objectives.dpo import diffusion_dpo_loss
from genalign.objectives.mapo import mapo_link, mapo_loss
from genalign.objectives.sft import sft_loss


def t(*v, grad=False):
    return torch.tensor(v, dtype=torch.float32, requires_grad=grad)


# -- MaPO ------------------------------------------------------------------------------------------------
def test_mapo_equal_losses_is_sft_plus_beta_ln2():
    loss, m = mapo_loss(t(0.2), t(0.2))
    assert loss.item() == pytest.approx(0.2 + 0.1 * math.log(2), abs=1e-6)
    assert m["pref_loss"] == pytest.approx(0.1 * math.log(2), abs=1e-6)


def test_mapo_hand_values_and_swap():
    assert mapo_loss(t(0.100), t(0.104))[0].item() == pytest.approx(0.1317862, abs=1e-5)
    assert mapo_loss(t(0.104), t(0.100))[0].item() == pytest.approx(0.2340863, abs=1e-5)
    # Sign regression against the diffusers "ORPO" prototype (which gives 0.1695 here).
    assert mapo_loss(t(0.100), t(0.104))[1]["pref_loss"] < 0.1 * math.log(2)


def test_mapo_gradients_at_equal_losses():
    lw, ll = t(0.1, grad=True), t(0.1, grad=True)
    mapo_loss(lw, ll)[0].backward()
    assert lw.grad.item() == pytest.approx(13.2917, abs=1e-3)
    assert ll.grad.item() == pytest.approx(-12.2917, abs=1e-3)


def test_mapo_limits():
    # beta -> 0: plain winner MSE.
    assert mapo_loss(t(0.3, 0.1), t(0.5, 0.2), beta=0.0)[0].item() == pytest.approx(0.2, abs=1e-7)
    # Bounded link: a badly denoised loser gets ~0 margin loss and ~0 gradient.
    ll = t(50.0, grad=True)
    loss, m = mapo_loss(t(0.1), ll)
    loss.backward()
    assert m["pref_loss"] < 1e-6 and abs(ll.grad.item()) < 1e-6
    # kappa*m -> -inf: margin term linear, ~ -beta*kappa*m.
    loss, m = mapo_loss(t(50.0), t(0.1))
    assert m["pref_loss"] == pytest.approx(-0.1 * 1000 * m["margin"], rel=1e-3)


def test_mapo_invariances():
    lw, ll = t(0.1, 0.3, 0.2), t(0.12, 0.25, 0.2)
    base = mapo_loss(lw, ll)[0]
    perm = torch.tensor([2, 0, 1])
    assert mapo_loss(lw[perm], ll[perm])[0].item() == pytest.approx(base.item(), abs=1e-6)
    assert mapo_loss(lw.repeat(2), ll.repeat(2))[0].item() == pytest.approx(base.item(), abs=1e-6)
    assert mapo_loss(ll, lw)[0].item() != pytest.approx(base.item(), abs=1e-3)


def test_mapo_numerics_stable_link():
    assert mapo_link(torch.tensor([0.0])).item() == 1.0
    assert torch.isnan(mapo_link(torch.tensor([0.0]), stable=False)).all()
    y = torch.tensor([0.03, 0.05, 0.1])
    assert torch.allclose(mapo_link(y), mapo_link(y, stable=False), atol=1e-3)
    x = torch.zeros(1, requires_grad=True)
    mapo_loss(x, x + 0.1)[0].backward()
    assert torch.isfinite(x.grad).all()
    # fp16 inputs are upcast: same result as the fp32 upcast tensors.
    lw, ll = torch.tensor([0.1, 0.2], dtype=torch.float16), torch.tensor([0.11, 0.19], dtype=torch.float16)
    assert mapo_loss(lw, ll)[0].item() == mapo_loss(lw.float(), ll.float())[0].item()


def test_mapo_paper_v2_pins_power_reading():
    assert mapo_loss(t(0.100), t(0.104), formulation="paper_v2", paper_beta=8)[0].item() == pytest.approx(0.1859713, abs=1e-5)
    with pytest.raises(ValueError):
        mapo_loss(t(0.1), t(0.1), formulation="orpo")


@pytest.mark.parametrize("param,value", [("snr_value", 0.25), ("num_train_timesteps", 500)])
def test_mapo_options_change_the_loss(param, value):
    assert mapo_loss(t(0.1), t(0.104), **{param: value})[0].item() != pytest.approx(0.1317862, abs=1e-5)


# -- Diffusion-DPO ----------------------------------------------------------------------------------------
def test_dpo_policy_equals_reference_is_ln2():
    lw, ll = t(0.3, 0.1), t(0.2, 0.4)
    loss, m = diffusion_dpo_loss(lw, ll, lw.detach().clone(), ll.detach().clone())
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert m["implicit_acc"] == 0.5


def test_dpo_hand_value_and_equivalence():
    loss, m = diffusion_dpo_loss(t(0.1000), t(0.1004), t(0.1), t(0.1))
    assert loss.item() == pytest.approx(0.3132617, abs=2e-5)
    assert m["logit"] == pytest.approx(1.0, abs=1e-3)
    # beta=5000 with the half factor == the diffusers SD1.5 port's 2500 without it.
    alt, _ = diffusion_dpo_loss(t(0.1000), t(0.1004), t(0.1), t(0.1), beta=2500, half_factor=False)
    assert alt.item() == pytest.approx(loss.item(), abs=1e-7)


def test_dpo_gradient_at_init_and_limits():
    lw, ll = t(0.1, grad=True), t(0.1, grad=True)
    diffusion_dpo_loss(lw, ll, t(0.1), t(0.1))[0].backward()
    assert lw.grad.item() == pytest.approx(1250.0, rel=1e-5)
    assert ll.grad.item() == pytest.approx(-1250.0, rel=1e-5)
    lw = t(0.1, grad=True)
    loss, _ = diffusion_dpo_loss(lw, t(0.3), t(0.2), t(0.1), beta=1e-6)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and abs(lw.grad.item()) < 1e-5


def test_dpo_invariances_and_reference_gets_no_grad():
    base = diffusion_dpo_loss(t(0.1), t(0.2), t(0.15), t(0.12))[0].item()
    assert diffusion_dpo_loss(t(0.2), t(0.2), t(0.25), t(0.12))[0].item() == pytest.approx(base, abs=1e-5)
    ref = t(0.15, grad=True)
    loss, _ = diffusion_dpo_loss(t(0.1, grad=True), t(0.2), ref, t(0.12))
    loss.backward()
    assert ref.grad is None
    with pytest.raises(ValueError):
        diffusion_dpo_loss(t(0.1), t(0.2, 0.3), t(0.1), t(0.1))


def test_sft_is_mean_of_winner_losses():
    assert sft_loss(t(0.1, 0.3))[0].item() == pytest.approx(0.2)
