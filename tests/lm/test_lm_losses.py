"""Hand-computed values, limits and gradient identities for the LM preference losses (cards treg.md §8, rrpo.md §8)."""

import math

import pytest
import torch
import torch.nn.functional as F

from genalign.objectives.rpo import dpo_loss, f_divergence_scores, fdpo_loss, rpo_loss
from genalign.objectives.rrpo import rrpo_loss, token_kl_from_logits
from genalign.objectives.treg import (
    simpo_treg_loss,
    token_rewards_from_contrastive_prompts,
    treg_loss,
)

T = torch.tensor


# ------------------------------------------------------------------------------------------------ DPO / RPO / f-DPO
def test_dpo_init_is_ln2():
    lp = T([-3.0, -7.5, -1.2])
    losses, cr, rr = dpo_loss(lp, lp - 1, lp, lp - 1, beta=0.1)
    assert torch.allclose(losses, torch.full((3,), math.log(2)), atol=1e-7)
    assert torch.all(cr == 0) and torch.all(rr == 0)


def test_dpo_hand_value_and_rewards():
    # chosen log-ratio +1, rejected −1, β = 0.5 → −logσ(1) = 0.3132617
    losses, cr, rr = dpo_loss(T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]), beta=0.5)
    assert losses.item() == pytest.approx(0.31326169, abs=1e-6)
    assert cr.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-0.5)


def test_dpo_beta_to_zero_limit_and_gradient_direction():
    pc = T([-1.0, -2.0], requires_grad=True)
    pr = T([-1.5, -0.5], requires_grad=True)
    rc, rl = T([-1.2, -1.0]), T([-1.0, -1.0])
    losses, _, _ = dpo_loss(pc, pr, rc, rl, beta=1e-6)
    assert torch.allclose(losses, torch.full((2,), math.log(2)), atol=1e-6)
    losses, _, _ = dpo_loss(pc, pr, rc, rl, beta=0.1)
    losses.sum().backward()
    assert torch.all(pc.grad < 0) and torch.all(pr.grad > 0)  # descent raises chosen, lowers rejected
    # dL/dlogπ(y_w) = −β·σ(−β·Δ)
    delta = (pc - rc) - (pr - rl)
    assert torch.allclose(pc.grad, -0.1 * torch.sigmoid(-0.1 * delta.detach()), atol=1e-7)


def test_dpo_reference_is_detached():
    rc = T([-1.0], requires_grad=True)
    losses, _, _ = dpo_loss(T([-1.0]), T([-1.0]), rc, T([-2.0]))
    assert not losses.requires_grad


def test_rpo_forms():
    pc, pr, rc, rl = T([-2.0, -6.0]), T([-3.0, -4.0]), T([-2.5, -5.0]), T([-2.0, -4.5])
    lens = T([2.0, 4.0])
    dpo, _, _ = dpo_loss(pc, pr, rc, rl, beta=0.1)
    s, _, _ = rpo_loss(pc, pr, rc, rl, beta=0.1, alpha=0.5, sft_reduction="sum")
    assert torch.allclose(s, dpo - 0.5 * 0.1 * pc, atol=1e-7)
    m, _, _ = rpo_loss(pc, pr, rc, rl, beta=0.1, alpha=0.5, sft_reduction="mean", chosen_lengths=lens)
    assert torch.allclose(m, dpo + 0.5 * T([1.0, 1.5]), atol=1e-7)
    b, _, _ = rpo_loss(pc, pr, rc, rl, beta=0.1, alpha=0.5, sft_reduction="batch_token_mean", chosen_lengths=lens)
    assert torch.allclose(b, dpo + 0.5 * (8.0 / 6.0), atol=1e-7)
    # equal lengths: mean == batch_token_mean
    eq = T([3.0, 3.0])
    m2, _, _ = rpo_loss(pc, pr, rc, rl, alpha=0.3, sft_reduction="mean", chosen_lengths=eq)
    b2, _, _ = rpo_loss(pc, pr, rc, rl, alpha=0.3, sft_reduction="batch_token_mean", chosen_lengths=eq)
    assert torch.allclose(m2.mean(), b2.mean(), atol=1e-7)
    with pytest.raises(ValueError):
        rpo_loss(pc, pr, rc, rl, sft_reduction="mean")
    # α = 0 is DPO
    z, _, _ = rpo_loss(pc, pr, rc, rl, alpha=0.0)
    assert torch.allclose(z, dpo_loss(pc, pr, rc, rl)[0])


def test_rpo_batch_token_mean_matches_trl_sigmoid_plus_sft():
    # TRL 1.16 sft term: −mean over all chosen tokens of the micro-batch; unequal lengths
    torch.manual_seed(0)
    tok = -torch.rand(2, 5)
    mask = T([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    pc = (tok * mask).sum(1)
    trl_sft = -tok[mask].mean()
    dpo, _, _ = dpo_loss(pc, pc - 1, pc + 0.2, pc - 0.7)
    ours, _, _ = rpo_loss(pc, pc - 1, pc + 0.2, pc - 0.7, alpha=0.7, sft_reduction="batch_token_mean",
                          chosen_lengths=mask.sum(1))
    assert ours.mean().item() == pytest.approx((dpo.mean() + 0.7 * trl_sft).item(), abs=1e-6)


def test_fdpo_scores_and_reverse_kl_equals_dpo():
    pc, pr, rc, rl = T([-2.0]), T([-3.0]), T([-2.5]), T([-2.0])
    assert torch.allclose(fdpo_loss(pc, pr, rc, rl, 0.1, "reverse_kl")[0], dpo_loss(pc, pr, rc, rl, 0.1)[0])
    x = T([0.5, -1.0])
    u = x.exp()
    assert torch.allclose(f_divergence_scores(x, "forward_kl"), 1 - 1 / u)
    assert torch.allclose(f_divergence_scores(x, "js_divergence"), torch.log(2 * u / (1 + u)))
    assert torch.allclose(f_divergence_scores(x, "alpha_divergence", 0.5), (u ** -0.5 - 1) / -0.5)
    assert torch.allclose(f_divergence_scores(x, "alpha_divergence", 1.0), x)
    # policy == reference → every divergence gives ln 2
    for d in ("forward_kl", "js_divergence", "alpha_divergence"):
        assert fdpo_loss(pc, pr, pc, pr, 0.1, d, 0.5)[0].item() == pytest.approx(math.log(2), abs=1e-7)
    with pytest.raises(ValueError):
        f_divergence_scores(x, "hellinger")


# ------------------------------------------------------------------------------------------------ T-REG
def _treg_case(requires_grad=False):
    pc = T([[-1.0, -2.0]], requires_grad=requires_grad)
    pr = T([[-1.0, -3.0]], requires_grad=requires_grad)
    rc, rr = T([[-1.5, -2.5]]), T([[-0.5, -2.5]])
    rw, rl = T([[0.25, -0.1]]), T([[-0.2, 0.1]])
    m = torch.ones(1, 2, dtype=torch.bool)
    return pc, pr, rc, rr, rw, rl, m, m


def test_treg_hand_values():
    pc, pr, rc, rr, rw, rl, mc, mr = _treg_case()
    losses, cr, rj, d = treg_loss(pc, pr, rc, rr, rw, rl, mc, mr, beta=0.1, alpha=0.5, return_details=True)
    assert cr.item() == pytest.approx(0.1, abs=1e-7) and rj.item() == pytest.approx(-0.1, abs=1e-7)
    assert d["dpo"].item() == pytest.approx(0.5981389, abs=1e-6)
    assert d["weight"].item() == pytest.approx(0.4501660, abs=1e-6)
    assert d["reg_chosen"].item() == pytest.approx(0.005, abs=1e-7)
    assert d["reg_rejected"].item() == pytest.approx(0.010, abs=1e-7)
    assert losses.item() == pytest.approx(0.6015151, abs=1e-6)
    ratio, _, _ = treg_loss(pc, pr, rc, rr, rw, rl, mc, mr, beta=0.1, alpha=0.5, reg_form="ratio")
    assert ratio.item() == pytest.approx(0.5953253, abs=1e-6)
    # sequence-level reference sums give the same logp-form value
    seq, _, _ = treg_loss(pc, pr, rc.sum(1), rr.sum(1), rw, rl, mc, mr, beta=0.1, alpha=0.5)
    assert seq.item() == pytest.approx(0.6015151, abs=1e-6)
    with pytest.raises(ValueError):
        treg_loss(pc, pr, rc.sum(1), rr.sum(1), rw, rl, mc, mr, reg_form="ratio")


def test_treg_gradients_and_identities():
    pc, pr, rc, rr, rw, rl, mc, mr = _treg_case(requires_grad=True)
    losses, _, _ = treg_loss(pc, pr, rc, rr, rw, rl, mc, mr, beta=0.1, alpha=0.5)
    g_c, g_r = torch.autograd.grad(losses.sum(), (pc, pr))
    assert g_c[0, 0].item() == pytest.approx(-0.0506437, abs=1e-6)
    # ratio form: identical gradients
    lr_, _, _ = treg_loss(pc, pr, rc, rr, rw, rl, mc, mr, beta=0.1, alpha=0.5, reg_form="ratio")
    g_c2, g_r2 = torch.autograd.grad(lr_.sum(), (pc, pr))
    assert torch.allclose(g_c, g_c2) and torch.allclose(g_r, g_r2)
    # gradient of L − L_DPO wrt each token log-prob = −α·w·β·r̂_t (w detached)
    dpo, _, _ = dpo_loss(pc.sum(1), pr.sum(1), rc.sum(1), rr.sum(1), beta=0.1)
    gd_c, gd_r = torch.autograd.grad(dpo.sum(), (pc, pr))
    w = torch.sigmoid(T(-0.2))
    assert torch.allclose(g_c - gd_c, -0.5 * w * 0.1 * rw, atol=1e-7)
    assert torch.allclose(g_r - gd_r, -0.5 * w * 0.1 * rl, atol=1e-7)


def test_treg_limits_and_mask():
    pc, pr, rc, rr, rw, rl, mc, mr = _treg_case()
    dpo, _, _ = dpo_loss(pc.sum(1), pr.sum(1), rc.sum(1), rr.sum(1), beta=0.1)
    assert torch.allclose(treg_loss(pc, pr, rc, rr, rw, rl, mc, mr, alpha=0.0)[0], dpo)
    z = torch.zeros_like(rw)
    assert torch.allclose(treg_loss(pc, pr, rc, rr, z, z, mc, mr, alpha=0.5)[0], dpo)
    # policy == reference → ln 2 + α·½·reg
    l0, _, _, d = treg_loss(rc, rr, rc, rr, rw, rl, mc, mr, alpha=0.0, return_details=True)
    assert l0.item() == pytest.approx(math.log(2), abs=1e-7)
    # masked positions (padding with garbage) are ignored
    pad = lambda x, v: torch.cat([x, T([[v]])], 1)  # noqa: E731
    m3 = T([[1, 1, 0]]).bool()
    a, _, _ = treg_loss(pad(pc, float("nan")), pad(pr, 9.0), pad(rc, 3.0), pad(rr, -9.0), pad(rw, 0.4),
                        pad(rl, 0.4), m3, m3, alpha=0.5)
    b, _, _ = treg_loss(pc, pr, rc, rr, rw, rl, mc, mr, alpha=0.5)
    assert torch.allclose(a, b)


def test_treg_alpha_and_reg_form_change_value():
    pc, pr, rc, rr, rw, rl, mc, mr = _treg_case()
    vals = {treg_loss(pc, pr, rc, rr, rw, rl, mc, mr, alpha=a, reg_form=f)[0].item()
            for a in (0.1, 0.5) for f in ("logp", "ratio")}
    assert len(vals) == 4


def test_token_rewards_from_contrastive_prompts():
    better = torch.log(T([[0.6, 0.5]]))
    worse = torch.log(T([[0.2, 0.5]]))
    r = token_rewards_from_contrastive_prompts(better, worse)
    assert r[0, 0].item() == pytest.approx(0.25, abs=1e-7)
    assert r[0, 1].item() == pytest.approx(0.0, abs=1e-7)
    # logits path
    lb = torch.log(T([[[0.6, 0.4]]]))
    lw = torch.log(T([[[0.2, 0.8]]]))
    r2 = token_rewards_from_contrastive_prompts(lb, lw, target_ids=T([[0]]))
    assert r2.item() == pytest.approx(0.25, abs=1e-6)
    r3 = token_rewards_from_contrastive_prompts(better, worse, mask=T([[1, 0]]))
    assert r3[0, 1] == 0
    assert torch.all(r.abs() < 0.5)


def test_simpo_treg_reduces_to_simpo():
    pc, pr, _, _, rw, rl, mc, mr = _treg_case()
    l, cw, cl = simpo_treg_loss(pc, pr, torch.zeros_like(rw), torch.zeros_like(rl), mc, mr, beta=10, gamma=3)
    rwv, rlv = 10 * pc.mean(1), 10 * pr.mean(1)
    assert torch.allclose(l, -F.logsigmoid(rwv - rlv - 3))
    l2, _, _ = simpo_treg_loss(pc, pr, rw, rl, mc, mr, beta=10, gamma=3, alpha=0.5)
    assert not torch.allclose(l, l2)


# ------------------------------------------------------------------------------------------------ RRPO
def _rrpo_case():
    # chosen: phrase tokens ℓ = (1, 1), one non-phrase ℓ = 0.3; rejected: phrase ℓ = −1, non-phrase ℓ = 0.7
    pc = T([[1.0, 1.0, 0.3]])
    rc = torch.zeros(1, 3)
    pr = T([[-1.0, 0.7]])
    rr = torch.zeros(1, 2)
    sc = T([[1, 1, 0]])
    sr = T([[1, 0]])
    mc = torch.ones(1, 3, dtype=torch.bool)
    return pc, pr, rc, rr, sc, sr, mc


def test_rrpo_hand_value():
    pc, pr, rc, rr, sc, sr, mc = _rrpo_case()
    ref_logits = torch.log(T([0.7, 0.3]))
    pol_logits = torch.log(T([0.5, 0.5]))
    kl_pos = token_kl_from_logits(pol_logits, ref_logits)
    assert kl_pos.item() == pytest.approx(0.0822829, abs=1e-6)
    kl = T([[kl_pos.item(), 0.0, 0.0]])
    losses, cr, rj, d = rrpo_loss(pc, pr, rc, rr, sc, sr, kl, mc, beta=0.1, alpha=0.01, return_details=True)
    assert d["margin"].item() == pytest.approx(0.3, abs=1e-7)
    assert d["pref"].item() == pytest.approx(0.5543552, abs=1e-6)
    assert losses.item() == pytest.approx(0.5551781, abs=1e-6)
    assert cr.item() == pytest.approx(0.2) and rj.item() == pytest.approx(-0.1)


def test_rrpo_kl_direction():
    ref_logits = torch.log(T([0.7, 0.3]))
    pol_logits = torch.log(T([0.5, 0.5]))
    assert token_kl_from_logits(ref_logits, pol_logits).item() == pytest.approx(0.0871767, abs=1e-6)
    assert token_kl_from_logits(pol_logits, ref_logits).item() != pytest.approx(0.0871767, abs=1e-4)


def test_rrpo_init_is_ln2():
    lp = -torch.rand(2, 4)
    seg = T([[0, 1, 1, 0], [2, 0, 1, 0]])
    m = torch.ones(2, 4, dtype=torch.bool)
    losses, _, _ = rrpo_loss(lp, lp, lp, lp, seg, seg, torch.zeros(2, 4), m)
    assert torch.allclose(losses, torch.full((2,), math.log(2)), atol=1e-7)


def test_rrpo_whole_response_segments_reduce_to_dpo():
    torch.manual_seed(1)
    pc, pr, rc, rr = (-torch.rand(3, 5) for _ in range(4))
    m = torch.ones(3, 5, dtype=torch.bool)
    seg = torch.ones(3, 5, dtype=torch.long)
    kl = torch.rand(3, 5)
    r, _, _ = rrpo_loss(pc, pr, rc, rr, seg, seg, kl, m, beta=0.1, alpha=0.0)
    d, _, _ = dpo_loss(pc.sum(1), pr.sum(1), rc.sum(1), rr.sum(1), beta=0.1)
    assert torch.allclose(r, d, atol=1e-6)
    # with α the KL term is added unscaled by β
    r2, _, _ = rrpo_loss(pc, pr, rc, rr, seg, seg, kl, m, beta=0.1, alpha=0.05)
    assert torch.allclose(r2, d + 0.05 * kl.sum(1), atol=1e-6)


def test_rrpo_non_phrase_tokens_and_union_identity():
    pc, pr, rc, rr, sc, sr, mc = _rrpo_case()
    kl = torch.zeros(1, 3)
    base = rrpo_loss(pc, pr, rc, rr, sc, sr, kl, mc, alpha=0.0)[0]
    pc2 = pc.clone()
    pc2[0, 2] = -5.0  # non-phrase chosen token
    assert torch.allclose(rrpo_loss(pc2, pr, rc, rr, sc, sr, kl, mc, alpha=0.0)[0], base)
    # split phrase 1 into two phrases / permute ids: unchanged
    assert torch.allclose(rrpo_loss(pc, pr, rc, rr, T([[1, 2, 0]]), T([[2, 0]]), kl, mc, alpha=0.0)[0], base)
    # gradient: margin gives nothing to the non-phrase token; KL does (α > 0)
    x = pc.clone().requires_grad_(True)
    g = torch.autograd.grad(rrpo_loss(x, pr, rc, rr, sc, sr, kl, mc, alpha=0.0)[0].sum(), x)[0]
    assert g[0, 2] == 0 and g[0, 0] < 0
    h = torch.randn(1, 3, 4, requires_grad=True)
    w = torch.randn(6, 4)
    from genalign.objectives.rrpo import token_kl_chunked

    href = torch.randn(1, 3, 4)
    klc = token_kl_chunked(h, href, w, mc, chunk_size=2)
    gh = torch.autograd.grad(rrpo_loss(pc, pr, rc, rr, sc, sr, klc, mc, alpha=0.01)[0].sum(), h)[0]
    assert gh[0, 2].abs().sum() > 0  # non-phrase chosen position gets the KL gradient


def test_rrpo_rejects_rows_without_phrases():
    pc, pr, rc, rr, sc, sr, mc = _rrpo_case()
    with pytest.raises(ValueError, match="no differing phrase"):
        rrpo_loss(pc, pr, rc, rr, torch.zeros_like(sc), torch.zeros_like(sr), torch.zeros(1, 3), mc)
    # −100 padding counts as 0
    with pytest.raises(ValueError):
        rrpo_loss(pc, pr, rc, rr, torch.full_like(sc, -100), torch.zeros_like(sr), torch.zeros(1, 3), mc)


def test_rrpo_alpha_changes_value():
    pc, pr, rc, rr, sc, sr, mc = _rrpo_case()
    kl = T([[0.1, 0.2, 0.3]])
    a = rrpo_loss(pc, pr, rc, rr, sc, sr, kl, mc, alpha=0.01)[0]
    b = rrpo_loss(pc, pr, rc, rr, sc, sr, kl, mc, alpha=0.1)[0]
    assert b.item() - a.item() == pytest.approx(0.09 * 0.6, abs=1e-6)
