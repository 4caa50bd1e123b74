"""Sub-sequence segment ids for RRPO: from ``<MASK>…</MASK>`` tags or from token diffs of chosen vs rejected.

Segment ids are ints aligned to completion tokens: 0 outside differing phrases, i ≥ 1 inside phrase i.
Source: RRPO official code ``pritamqu/RRPO@a905573`` ``train_llavavideo.py::process_masked_tokens`` (tags) and
``videochat2/diff_lib.py::get_diff_signs`` (automatic diff); re-implemented with :mod:`difflib`.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch

def tag_token_variants(tokenizer, start_tag: str = "<MASK>", end_tag: str = "</MASK>", fused_space: bool = True):
    """Token-id sequences that encode the phrase tags, longest first.

    ``tokenizer`` must already know the tags as special tokens (the official code adds them to a tokenizer copy).
    With ``fused_space`` (official [code]) the variants ``" <MASK>"`` / ``"<MASK> "`` are included, so the space
    token next to a tag is removed together with it; disable for character-level tokenizers where that space is a
    token of the plain text.

    Returns:
        ``(start_variants, end_variants)``: lists of ``list[int]``, longest first.

    Raises:
        ValueError: if a bare tag does not encode to exactly one token.
    """
    def enc(s):
        return list(tokenizer(s, add_special_tokens=False)["input_ids"])

    out = []
    for tag in (start_tag, end_tag):
        bare = enc(tag)
        if len(bare) != 1:
            raise ValueError(f"tag {tag!r} must be a single special token, got ids {bare}; add it as a special token")
        variants = [bare]
        if fused_space:
            variants += [v for v in (enc(" " + tag), enc(tag + " ")) if v != bare]
        out.append(sorted({tuple(v) for v in variants}, key=len, reverse=True))
    return [list(v) for v in out[0]], [list(v) for v in out[1]]


def strip_tag_tokens(
    ids: Sequence[int], start_variants: Sequence[Sequence[int]], end_variants: Sequence[Sequence[int]]
) -> tuple[list[int], list[int]]:
    """Remove tag tokens from a tagged token sequence and number the enclosed phrases.

    Args:
        ids: token ids of the tagged text. start_variants / end_variants: id sequences of the opening / closing tag
            (from :func:`tag_token_variants`); matched longest first at every position.

    Returns:
        ``(kept_ids, segment_ids)`` of equal length: every kept token inside the i-th tag pair gets i, others 0.

    Source: official ``train_llavavideo.py::process_masked_tokens`` (same matching rule; genalign also handles a
    tag as the very last token).
    """
    starts = sorted((list(v) for v in start_variants), key=len, reverse=True)
    ends = sorted((list(v) for v in end_variants), key=len, reverse=True)
    ids = list(ids)
    kept, seg = [], []
    k, phrase, inside = 0, 0, False
    while k < len(ids):
        m = next((v for v in starts if ids[k : k + len(v)] == v), None)
        if m is not None:
            phrase, inside, k = phrase + 1, True, k + len(m)
            continue
        m = next((v for v in ends if ids[k : k + len(v)] == v), None)
        if m is not None:
            inside, k = False, k + len(m)
            continue
        kept.append(ids[k])
        seg.append(phrase if inside else 0)
        k += 1
    return kept, seg


def segment_ids_from_tags(
    tagged_ids: Sequence[int],
    plain_ids: Sequence[int],
    start_variants: Sequence[Sequence[int]],
    end_variants: Sequence[Sequence[int]],
) -> tuple[list[int], str]:
    """Segment ids for ``plain_ids`` (the trainer's tokenisation) from the tokenised ``<MASK>…</MASK>`` text.

    Rules (official [code]): strip the tags; if the stripped ids equal ``plain_ids`` use their phrase numbering; if
    only the lengths agree, every maximal run of differing positions must carry a single segment id, else the sample
    is zeroed; a length mismatch zeroes the sample.

    Args:
        tagged_ids: ids of the tagged response. plain_ids: ids of the untagged response.
        start_variants, end_variants: tag id sequences (see :func:`tag_token_variants`).

    Returns:
        ``(segment_ids, status)`` with ``len(segment_ids) == len(plain_ids)`` and status ``"ok"``,
        ``"ok_fused"`` (same length, differences inside phrases), ``"length_mismatch"`` or ``"id_mismatch"``
        (both zeroed — count them).
    """
    kept, seg = strip_tag_tokens(tagged_ids, start_variants, end_variants)
    plain = list(plain_ids)
    if len(kept) != len(plain):
        return [0] * len(plain), "length_mismatch"
    if kept == plain:
        return seg, "ok"
    diff = [a != b for a, b in zip(kept, plain)]
    t = 0
    while t < len(diff):
        if not diff[t]:
            t += 1
            continue
        e = t
        while e < len(diff) and diff[e]:
            e += 1
        if len(set(seg[t:e])) != 1:
            return [0] * len(plain), "id_mismatch"
        t = e
    return seg, "ok_fused"


def segment_ids_from_diff(
    chosen_ids: Sequence[int], rejected_ids: Sequence[int], min_match: int = 1, autojunk: bool = True
) -> tuple[list[int], list[int]]:
    """Phrase ids from an automatic token diff of the chosen and rejected responses.

    ``difflib.SequenceMatcher(None, chosen, rejected, autojunk=autojunk)``; matching blocks shorter than
    ``min_match`` are dropped; every aligned gap between consecutive kept blocks (and before the first / after the
    last) where **both** sides are non-empty becomes phrase pair 1, 2, …; pure insertions / deletions get id 0.

    Args:
        chosen_ids, rejected_ids: completion token ids (ints).
        min_match: minimum matching-block length (official ``fetch_sign`` uses 1 [code]).
        autojunk: difflib's popular-element heuristic (on in the official code; matters for ≥ 200 tokens).

    Returns:
        ``(chosen_segment_ids, rejected_segment_ids)`` with the lengths of the inputs.

    Source: official ``videochat2/diff_lib.py::get_diff_signs`` (Muffin's diff helpers), re-implemented. The
    official code diffs whole label rows (prompt −100s included); genalign diffs the completions.
    """
    a, b = list(chosen_ids), list(rejected_ids)
    sm = difflib.SequenceMatcher(None, a, b, autojunk=autojunk)
    blocks = sm.get_matching_blocks()
    blocks = [m for m in blocks[:-1] if m.size >= min_match] + [blocks[-1]]
    seg_a, seg_b = [0] * len(a), [0] * len(b)
    phrase = 1
    ia = ib = 0
    for m in blocks:
        if m.a > ia and m.b > ib:  # both sides changed between the previous block and this one
            for i in range(ia, m.a):
                seg_a[i] = phrase
            for i in range(ib, m.b):
                seg_b[i] = phrase
            phrase += 1
        ia, ib = m.a + m.size, m.b + m.size
    return seg_a, seg_b
