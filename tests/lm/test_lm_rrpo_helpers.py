"""Chunked token KL / log-probs vs dense, and RRPO segment-id extraction (tags and difflib)."""

import difflib
import random

import pytest
import torch

from genalign.objectives.rrpo import (
    segment_ids_from_diff,
    segment_ids_from_tags,
    strip_tag_tokens,
    tag_token_variants,
    token_kl_chunked,
    token_kl_from_logits,
    token_logps_chunked,
)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_chunked_kl_equals_dense_values_and_grads(chunk):
    torch.manual_seed(0)
    B, L, H, V = 2, 6, 8, 50
    hp = torch.randn(B, L, H, requires_grad=True)
    hr = torch.randn(B, L, H)
    w = torch.randn(V, H, requires_grad=True)
    wr = torch.randn(V, H)
    bias = torch.randn(V)
    mask = torch.rand(B, L) > 0.3
    dense = token_kl_from_logits(hp @ w.T + bias, hr @ wr.T + bias, mask)
    gd = torch.autograd.grad(dense.sum(), (hp, w))
    chunked = token_kl_chunked(hp, hr, w, mask, chunk, ref_lm_head_weight=wr, lm_head_bias=bias)
    gc = torch.autograd.grad(chunked.sum(), (hp, w))
    assert torch.allclose(dense, chunked, atol=1e-6)
    assert torch.all(chunked[~mask] == 0) and torch.all(chunked[mask] >= -1e-7)
    for a, b in zip(gd, gc):
        assert torch.allclose(a, b, atol=1e-5)


def test_chunked_kl_zero_when_identical_and_no_grad_path():
    torch.manual_seed(0)
    h = torch.randn(1, 4, 8)
    w = torch.randn(20, 8)
    with torch.no_grad():
        kl = token_kl_chunked(h, h, w, torch.ones(1, 4, dtype=torch.bool), chunk_size=3)
    assert torch.allclose(kl, torch.zeros(1, 4), atol=1e-6)
    with pytest.raises(ValueError):
        token_kl_chunked(h, h, w, torch.ones(1, 4, dtype=torch.bool), chunk_size=0)


def test_chunked_kl_does_not_keep_full_logits():
    # saved-for-backward tensors are the checkpoint inputs only, never a [N, V] logits tensor
    torch.manual_seed(0)
    N, H, V = 64, 8, 4096
    hp = torch.randn(1, N, H, requires_grad=True)
    w = torch.randn(V, H)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = token_kl_chunked(hp, torch.randn(1, N, H), w, torch.ones(1, N, dtype=torch.bool), chunk_size=8)
    out.sum().backward()
    assert max(sizes) < N * V / 4  # the dense version saves ≥ N·V floats several times


@pytest.mark.parametrize("chunk", [1, 5, 100])
def test_chunked_logps_equal_dense(chunk):
    torch.manual_seed(0)
    h = torch.randn(3, 5, 8, requires_grad=True)
    w = torch.randn(30, 8)
    ids = torch.randint(0, 30, (3, 5))
    mask = torch.rand(3, 5) > 0.4
    dense = torch.log_softmax(h @ w.T, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask
    out = token_logps_chunked(h, w, ids, mask, chunk)
    assert torch.allclose(dense, out, atol=1e-6)
    g1 = torch.autograd.grad(dense.sum(), h)[0]
    g2 = torch.autograd.grad(out.sum(), h)[0]
    assert torch.allclose(g1, g2, atol=1e-6)


# ------------------------------------------------------------------------------------------------ tags
S, E, SP = 100, 101, 7  # <MASK>, </MASK>, a "space" token
STARTS = [[SP, S], [S, SP], [S]]
ENDS = [[SP, E], [E, SP], [E]]


def test_strip_tags_plain_and_fused_variants():
    # "a <MASK> b c </MASK> d <MASK>e</MASK>"
    ids = [1, SP, S, 2, 3, E, SP, 4, S, 5, E]
    kept, seg = strip_tag_tokens(ids, STARTS, ENDS)
    assert kept == [1, 2, 3, 4, 5]
    assert seg == [0, 1, 1, 0, 2]
    # bare variants only
    kept, seg = strip_tag_tokens([1, S, 2, E, 3], [[S]], [[E]])
    assert kept == [1, 2, 3] and seg == [0, 1, 0]
    # tag as the last token
    kept, seg = strip_tag_tokens([1, S, 2, E], [[S]], [[E]])
    assert kept == [1, 2] and seg == [0, 1]


def test_segment_ids_from_tags_statuses():
    tagged = [1, S, 2, 3, E, 4]
    assert segment_ids_from_tags(tagged, [1, 2, 3, 4], [[S]], [[E]]) == ([0, 1, 1, 0], "ok")
    # same length, difference inside the phrase (fused-space token) → kept
    assert segment_ids_from_tags(tagged, [1, 9, 3, 4], [[S]], [[E]]) == ([0, 1, 1, 0], "ok_fused")
    # differing run straddling phrase boundary → zeroed
    assert segment_ids_from_tags(tagged, [9, 9, 3, 4], [[S]], [[E]]) == ([0, 0, 0, 0], "id_mismatch")
    assert segment_ids_from_tags(tagged, [1, 2, 3], [[S]], [[E]]) == ([0, 0, 0], "length_mismatch")


def test_tag_token_variants_with_real_tokenizer():
    from genalign.pipelines.language import build_char_tokenizer

    tok = build_char_tokenizer(extra_special_tokens=["<MASK>", "</MASK>"])
    starts, ends = tag_token_variants(tok, fused_space=False)
    assert starts == [[tok.convert_tokens_to_ids("<MASK>")]]
    starts, _ = tag_token_variants(tok, fused_space=True)
    assert len(starts[0]) == 2  # longest first
    plain = tok("the cat sat", add_special_tokens=False)["input_ids"]
    tagged = tok("the <MASK>cat</MASK> sat", add_special_tokens=False)["input_ids"]
    seg, status = segment_ids_from_tags(tagged, plain, *tag_token_variants(tok, fused_space=False))
    assert status == "ok" and seg == [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0]


# ------------------------------------------------------------------------------------------------ diff
def _official_get_diff_signs(seq1, seq2, min_match_size=1):
    """Independent transcription of the official span logic (Muffin diff_lib + get_diff_signs), for comparison."""
    sm = difflib.SequenceMatcher(None, seq1, seq2)
    mb = sm.get_matching_blocks()
    mb = [m for m in mb[:-1] if m[2] >= min_match_size] + [mb[-1]]
    a_m = [(x[0], x[0] + x[2]) for x in mb]
    b_m = [(x[1], x[1] + x[2]) for x in mb]

    def spans(matches, length):
        i, j = 0, matches[0][0]
        out = []
        for idx in range(len(matches)):
            out.append((i, j))
            out.append(matches[idx])
            i, j = (matches[idx][1], matches[idx + 1][0]) if idx + 1 < len(matches) else (matches[idx][1], length)
        return out

    a_s, b_s = spans(a_m, len(seq1)), spans(b_m, len(seq2))
    mod = {}
    for idx, (a, b) in enumerate(zip(a_s, b_s)):
        if idx % 2 == 0 and a[0] != a[1] and b[0] != b[1]:
            mod[a] = b
    s1, s2 = [0] * len(seq1), [0] * len(seq2)
    for n, (a, b) in enumerate(zip(mod.keys(), mod.values()), start=1):
        for i in range(a[0], a[-1]):
            s1[i] = n
        for i in range(b[0], b[-1]):
            s2[i] = n
    return s1, s2


def test_diff_simple_cases():
    a = [1, 2, 3, 4, 5]
    b = [1, 2, 9, 4, 5]
    assert segment_ids_from_diff(a, b) == ([0, 0, 1, 0, 0], [0, 0, 1, 0, 0])
    # pure insertion → no phrase
    assert segment_ids_from_diff([1, 2, 3], [1, 2, 7, 3]) == ([0, 0, 0], [0, 0, 0, 0])
    # two substitutions → two phrases, different lengths allowed
    assert segment_ids_from_diff([1, 5, 2, 3, 6], [1, 8, 8, 2, 3, 7]) == ([0, 1, 0, 0, 2], [0, 1, 1, 0, 0, 2])


def test_diff_matches_official_logic_random_with_autojunk():
    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(1, 250)
        a = [rng.randint(0, 12) for _ in range(n)]
        b = list(a)
        for _ in range(rng.randint(1, 6)):
            op = rng.random()
            pos = rng.randrange(len(b) + 1)
            if op < 0.5 and b:
                b[min(pos, len(b) - 1)] = rng.randint(0, 12)
            elif op < 0.75:
                b.insert(pos, rng.randint(0, 12))
            elif b:
                del b[min(pos, len(b) - 1)]
        assert segment_ids_from_diff(a, b) == _official_get_diff_signs(a, b)
        assert segment_ids_from_diff(a, b, min_match=3) == _official_get_diff_signs(a, b, 3)


# ------------------------------------------------------------------------------------------ one-pass LM head
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_one_pass_logps_and_kl_equal_dense_values_and_grads(chunk):
    """token_stats_chunked (issue 16 item 2) gives the dense log_softmax log-probs and KL(π_ref‖π_θ), and the same
    gradient w.r.t. the policy hidden states, for any chunking."""
    from genalign.pipelines.lm_head import token_stats_chunked
    from genalign.objectives.treg import gather_token_logps

    torch.manual_seed(1)
    R, L, H, V = 4, 5, 8, 40  # rows [chosen(2); rejected(2)]
    hp = torch.randn(R, L, H, requires_grad=True)
    hr = torch.randn(R, L, H)
    w, bias = torch.randn(V, H), torch.randn(V)
    ids = torch.randint(0, V, (R, L))
    mask = torch.rand(R, L) > 0.3
    up_lp, up_kl = torch.randn(R, L), torch.randn(2, L)  # arbitrary upstream gradients
    logps, ref_logps, kl = token_stats_chunked(hp, hr, w, ids, mask, kl_rows=2, chunk_size=chunk, lm_head_bias=bias)
    ((logps * up_lp).sum() + (kl * up_kl).sum()).backward()
    g_fused = hp.grad.clone()
    hp.grad = None
    zp, zr = hp @ w.T + bias, hr @ w.T + bias
    d_lp = torch.where(mask, gather_token_logps(zp, ids), torch.zeros(()))
    d_kl = token_kl_from_logits(zp[:2], zr[:2], mask[:2])
    ((d_lp * up_lp).sum() + (d_kl * up_kl).sum()).backward()
    assert torch.allclose(logps, d_lp, atol=1e-5)
    assert torch.allclose(ref_logps, torch.where(mask, gather_token_logps(zr, ids), torch.zeros(())), atol=1e-5)
    assert torch.allclose(kl, d_kl, atol=1e-5)
    assert torch.allclose(g_fused, hp.grad, atol=1e-5)
    assert not ref_logps.requires_grad


def test_one_pass_projects_each_position_once_and_backward_has_no_lm_head_matmul():
    """LM-head FLOPs: policy and reference logits once per position, p·W once per position, q·W once per chosen
    position; backward adds no matmul (the old path recomputed the chunks, reference included, in backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    from genalign.pipelines.lm_head import token_kl_chunked, token_logps_chunked, token_stats_chunked

    R, L, H, V = 4, 6, 16, 64
    hp = torch.randn(R, L, H, requires_grad=True)
    hr, w, ids = torch.randn(R, L, H), torch.randn(V, H), torch.randint(0, V, (R, L))
    mask = torch.ones(R, L, dtype=torch.bool)
    n, n_kl = R * L, 2 * L
    with FlopCounterMode(display=False) as fwd:
        logps, _, kl = token_stats_chunked(hp, hr, w, ids, mask, kl_rows=2, chunk_size=5)
    with FlopCounterMode(display=False) as bwd:
        (logps.sum() + kl.sum()).backward()
    assert fwd.get_total_flops() == 2 * H * V * (3 * n + n_kl)
    assert bwd.get_total_flops() == 0
    hp.grad = None
    with FlopCounterMode(display=False) as old:  # the previous path: logps + no-grad ref + KL, checkpointed
        lp = token_logps_chunked(hp, w, ids, mask, 5)
        with torch.no_grad():
            token_logps_chunked(hr, w, ids, mask, 5)
        k = token_kl_chunked(hp[:2], hr[:2], w, mask[:2], 5)
        (lp.sum() + k.sum()).backward()
    assert old.get_total_flops() > fwd.get_total_flops()
