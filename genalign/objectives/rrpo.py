"""RRPO: Refined Regularized Preference Optimization (sub-sequence rewards + token-wise KL).

Paper: Sarkar & Etemad, *Self-alignment of Large Video Language Models with Refined Regularized Preference
Optimization*, arXiv 2504.12083, NeurIPS 2025. Official code (Apache-2.0)
``pritamqu/RRPO@a90557376ee10b93b5e07a698a46da652dfebeb7``: ``llava/losses.py`` (loss, ``per_position_kl``),
``train_llavavideo.py::process_masked_tokens`` (tags → segment ids), ``videochat2/diff_lib.py::get_diff_signs``
(automatic diff). Card: rrpo.md. genalign re-implements; nothing is copied.

Conventions: per-token tensors are ``[B, T]`` and already shifted (position t scores completion token t);
segment ids are ints, 0 outside differing phrases, i ≥ 1 inside phrase i (negative values such as −100 padding
count as 0). All arithmetic float32.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from genalign.data.segments import (
    segment_ids_from_diff,
    segment_ids_from_tags,
    strip_tag_tokens,
    tag_token_variants,
)
from genalign.objectives.lm_base import LMLossOutput, LMObjective, LMParams, TokenForward, masked_sum
from genalign.pipelines.language import tokenize_text
from genalign.pipelines.lm_head import token_kl_chunked, token_logps_chunked
from genalign.registry import objectives as OBJECTIVES

__all__ = [
    "rrpo_loss",
    "token_kl_chunked",
    "token_kl_from_logits",
    "token_logps_chunked",
    "strip_tag_tokens",
    "segment_ids_from_tags",
    "segment_ids_from_diff",
    "tag_token_variants",
    "RRPO",
    "TAG_COLUMNS",
]

TAG_COLUMNS = (("chosen_masked", "rejected_masked"), ("answer_masked", "pred_masked"))


# --------------------------------------------------------------------------------------------------- loss
def rrpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_segment_ids: torch.Tensor,
    rejected_segment_ids: torch.Tensor,
    chosen_token_kl: torch.Tensor,
    chosen_mask: torch.Tensor,
    beta: float = 0.1,
    alpha: float = 0.01,
    rejected_mask: torch.Tensor | None = None,
    return_details: bool = False,
):
    """RRPO loss per pair: ``−logσ(u) + α·D_TKL(x, y_w)``.

    ``u = β·(Σ_{t∈∪S⁺} ℓ_t − Σ_{t∈∪S⁻} ℓ_t)`` with ℓ_t = log π_θ(y_t|·) − log π_ref(y_t|·) summed over the phrase
    tokens (segment id ≥ 1) only — the phrase pairing does not matter (union identity), and
    ``D_TKL = Σ_t KL(π_ref ‖ π_θ)`` over **all** chosen completion positions (``chosen_token_kl`` masked by
    ``chosen_mask``), not scaled by β.

    Args:
        policy_chosen_logps, ref_chosen_logps: [B, T] per-token log-probs of the chosen completion tokens.
        policy_rejected_logps, ref_rejected_logps: [B, T'] same for the rejected completion (reference detached).
        chosen_segment_ids: [B, T] int phrase ids (0 outside phrases). rejected_segment_ids: [B, T'].
        chosen_token_kl: [B, T] per-position KL(π_ref‖π_θ) ≥ 0 (e.g. from :func:`token_kl_chunked`).
        chosen_mask: [B, T] chosen completion mask (KL summed over it; phrase tokens outside it are ignored).
        beta: β > 0 (LLaVA-Video recipe 0.1 [code]; official range 0.1–0.9).
        alpha: α ≥ 0 KL weight (LLaVA-Video recipe 0.01 [code]; range 0.01–0.1).
        rejected_mask: optional [B, T'] mask for rejected phrase tokens (default: all positions).
        return_details: also return ``{"margin": u, "kl": D_TKL, "pref": −logσ(u)}`` per pair.

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])`` — rewards are β·Σ phrase log-ratios, detached.

    Raises:
        ValueError: a pair with no phrase token on either side (no signal; drop such rows beforehand), or
        ``beta <= 0``.

    Source: official ``llava/losses.py::RRPO.loss`` / ``get_batch_logps``; paper Eq. for L_RRPO with the code's
    sign of the KL term (card rrpo.md §2).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if rejected_mask is None:
        rejected_mask = torch.ones_like(rejected_segment_ids, dtype=torch.bool)
    chosen_phrase = (chosen_segment_ids > 0) & chosen_mask.bool()
    rejected_phrase = (rejected_segment_ids > 0) & rejected_mask.bool()
    empty = ~(chosen_phrase.any(1) | rejected_phrase.any(1))
    if bool(empty.any()):
        rows = torch.nonzero(empty).flatten().tolist()
        raise ValueError(f"RRPO pairs {rows} have no differing phrase on either side; drop them before training")
    chosen_lr = policy_chosen_logps.float() - ref_chosen_logps.detach().float()
    rejected_lr = policy_rejected_logps.float() - ref_rejected_logps.detach().float()
    chosen_values = beta * masked_sum(chosen_lr, chosen_phrase)
    rejected_values = beta * masked_sum(rejected_lr, rejected_phrase)
    margin = chosen_values - rejected_values
    kl = masked_sum(chosen_token_kl, chosen_mask)
    pref = -F.logsigmoid(margin)
    losses = pref + alpha * kl
    out = (losses, chosen_values.detach(), rejected_values.detach())
    if return_details:
        return out + ({"margin": margin.detach(), "kl": kl.detach(), "pref": pref.detach()},)
    return out


# --------------------------------------------------------------------------------------------------- token KL
def token_kl_from_logits(policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor | None = None):
    """Dense per-position ``KL(π_ref ‖ π_θ) = Σ_v π_ref(v)(log π_ref(v) − log π_θ(v))`` in float32.

    Args:
        policy_logits, ref_logits: [..., V] logits (reference detached).
        mask: optional [...] mask; KL is 0 elsewhere.

    Returns:
        [...] KL in nats, ≥ 0.

    Source: official ``per_position_kl`` (which takes ``softmax().log()``; genalign uses ``log_softmax``).
    """
    lp = torch.log_softmax(policy_logits.float(), dim=-1)
    lq = torch.log_softmax(ref_logits.detach().float(), dim=-1)
    kl = (lq.exp() * (lq - lp)).sum(-1)
    if mask is not None:
        kl = torch.where(mask.bool(), kl, torch.zeros_like(kl))
    return kl


# --------------------------------------------------------------------------------------------------- objective
@OBJECTIVES.register("rrpo", "RRPO: sub-sequence rewards + token-wise KL (Sarkar & Etemad, NeurIPS 2025), on TRL")
class RRPO(LMObjective):
    """RRPO on TRL: phrase margins + token-wise KL(π_ref‖π_θ) on the chosen response (:func:`rrpo_loss`).

    Segment ids come from ``<MASK>…</MASK>``-tagged copies of the responses (``chosen_masked`` /
    ``rejected_masked`` or the official ``answer_masked`` / ``pred_masked``) or from a token diff
    (``segments``). Pairs with no phrase are dropped and counted before training; pairs whose phrase is cut off by
    truncation are left out of the loss and counted (``counts["dropped_after_truncation"]``), never a crash. The
    per-token log-probs and the full-vocabulary KL come from one chunked pass over the final hidden states
    (:func:`genalign.pipelines.lm_head.token_stats_chunked`).

    Source: RRPO (arXiv 2504.12083), official ``pritamqu/RRPO@a905573`` ``llava/losses.py``; card rrpo.md.
    """

    online_reference = True  # the token KL needs the reference distribution at every position
    video = True

    class Config(LMParams):
        """β, α [code] (LLaVA-Video 0.1 / 0.01); ``kl_chunk_size``: positions per LM-head chunk (memory knob);
        ``segments``: ``auto`` (tags if tag columns exist, else diff) | ``tags`` | ``diff``; ``min_match``: diff
        minimum matching block (1 [code]); ``fused_space_tags``: tag variants with a fused space ([code]; off for
        character-level tokenizers); ``tag_open`` / ``tag_close``: phrase tags ([code] ``<MASK>``/``</MASK>``)."""

        beta: float = Field(0.1, gt=0)
        alpha: float = Field(0.01, ge=0)
        kl_chunk_size: int = Field(1024, ge=1)
        segments: Literal["auto", "tags", "diff"] = "auto"
        min_match: int = Field(1, ge=1)
        fused_space_tags: bool = True
        tag_open: str = "<MASK>"
        tag_close: str = "</MASK>"

    def __init__(self, config=None, model=None):
        super().__init__(config, model)
        self.counts: Counter = Counter()

    def token_fields(self):
        return {"segment_ids": ("chosen_segment_ids", "rejected_segment_ids", 0)}

    def collator_options(self):
        c = self.config
        return {"segment_mode": c.segments, "min_match": c.min_match, "fused_space_tags": c.fused_space_tags,
                "tag_open": c.tag_open, "tag_close": c.tag_close}

    def extra_columns(self):
        return super().extra_columns() + [c for pair in TAG_COLUMNS for c in pair]

    def prepare_dataset(self, dataset, processing_class, name, counts):
        """Segment ids per completion token (tags or diff); rows without a phrase are dropped and counted.

        Raises:
            ValueError: ``segments='tags'`` without tag columns, or no row has a phrase.
        """
        c = self.config
        cols = next((t for t in TAG_COLUMNS if t[0] in dataset.column_names), None)
        mode = c.segments if c.segments != "auto" else ("tags" if cols else "diff")
        if mode == "tags" and cols is None:
            raise ValueError(f"segments='tags' needs columns {TAG_COLUMNS}")
        tok = getattr(processing_class, "tokenizer", processing_class)
        if mode == "tags":
            tag_tok = copy.deepcopy(tok)
            tag_tok.add_special_tokens({"additional_special_tokens": [c.tag_open, c.tag_close]})
            starts, ends = tag_token_variants(tag_tok, c.tag_open, c.tag_close, fused_space=c.fused_space_tags)
        statuses: Counter = Counter()

        def add(ex):
            if mode == "diff":
                statuses["diff"] += 1
                sc, sr = segment_ids_from_diff(ex["chosen_ids"], ex["rejected_ids"], min_match=c.min_match)
                return {"chosen_segment_ids": sc, "rejected_segment_ids": sr}
            segs = []
            for side, col in (("chosen", cols[0]), ("rejected", cols[1])):
                tagged = ex[col]
                if isinstance(ex["prompt"], list):
                    full = tokenize_text(tag_tok, ex["prompt"] + [{"role": "assistant", "content": tagged}])
                else:
                    if not tagged.endswith(tok.eos_token) and ex[side].endswith(tok.eos_token):
                        tagged = tagged + tok.eos_token
                    full = tokenize_text(tag_tok, ex["prompt"] + tagged)
                plain = list(ex["prompt_ids"]) + list(ex[f"{side}_ids"])
                seg, status = segment_ids_from_tags(full, plain, starts, ends)
                statuses[f"{side}/{status}"] += 1
                segs.append(seg[len(ex["prompt_ids"]):])
            return {"chosen_segment_ids": segs[0], "rejected_segment_ids": segs[1]}

        dataset = dataset.map(add)
        n = len(dataset)
        dataset = dataset.filter(lambda ex: any(s > 0 for s in ex["chosen_segment_ids"])
                                 or any(s > 0 for s in ex["rejected_segment_ids"]))
        for k, v in statuses.items():
            counts[f"{name}/segments/{k}"] += v
        if len(dataset) < n:
            counts[f"{name}/dropped_no_phrase"] += n - len(dataset)
        if len(dataset) == 0:
            raise ValueError(f"RRPO: no {name} pair has a differing phrase (statuses {dict(statuses)})")
        return dataset

    def lm_loss(self, fwd: TokenForward) -> LMLossOutput:
        c = self.config
        logps, ref_logps, kl = fwd.token_logps_and_kl(c.kl_chunk_size)
        B = logps.size(0) // 2
        mc, mr = self.split(fwd.mask)
        seg_c, seg_r = self.split(fwd.field("segment_ids"))
        # a phrase cut off by truncation leaves a pair without signal: leave it out of the loss and count it
        keep = ((seg_c > 0) & mc).any(1) | ((seg_r > 0) & mr).any(1)
        if not bool(keep.all()):
            self.counts["dropped_after_truncation"] += int((~keep).sum())
        if not bool(keep.any()):
            zero = 0.0 * logps.sum() + 0.0 * kl.sum()
            return LMLossOutput(zero[None], zero.detach()[None], zero.detach()[None], {})
        k = keep
        losses, cw, cl, d = rrpo_loss(logps[:B][k], logps[B:][k], ref_logps[:B][k], ref_logps[B:][k], seg_c[k],
                                      seg_r[k], kl[k], mc[k], beta=c.beta, alpha=c.alpha, rejected_mask=mr[k],
                                      return_details=True)
        return LMLossOutput(losses, cw, cl, {"pref_loss": d["pref"], "kl": d["kl"], "kl_weighted": c.alpha * d["kl"],
                                             "logps/chosen": masked_sum(logps[:B], mc).detach(),
                                             "logps/rejected": masked_sum(logps[B:], mr).detach()})
