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


import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from genalign.objectives.rpo import masked_sum

__all__ = [
    "rrpo_loss",
    "token_kl_chunked",
    "token_kl_from_logits",
    "token_logps_chunked",
    "strip_tag_tokens",
    "segment_ids_from_tags",
    "segment_ids_from_diff",
    "tag_token_variants",
]


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


def _linear32(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(h.float(), w, None if b is None else b.float())


def _kl_chunk(hp, hr, w, wr, b, br):
    lp = torch.log_softmax(_linear32(hp, w, b), dim=-1)
    lq = torch.log_softmax(_linear32(hr, wr, br), dim=-1)
    return (lq.exp() * (lq - lp)).sum(-1)


def _logp_chunk(h, w, b, ids):
    logits = _linear32(h, w, b)
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def token_kl_chunked(
    policy_hidden: torch.Tensor,
    ref_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int = 1024,
    ref_lm_head_weight: torch.Tensor | None = None,
    lm_head_bias: torch.Tensor | None = None,
    ref_lm_head_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full-vocabulary per-position ``KL(π_ref ‖ π_θ)`` from final hidden states, ``chunk_size`` positions at a time.

    Only masked positions are projected through the LM head; each chunk runs under activation checkpointing, so
    neither the forward nor the saved-for-backward state ever holds more than ``chunk_size × V`` logits (the
    chunk's logits are recomputed in backward). Gradients flow to ``policy_hidden`` (and ``lm_head_weight`` if it
    requires grad); the reference side is detached.

    Args:
        policy_hidden: [B, T, H] policy final hidden states, position t predicting token t+1 (already shifted).
        ref_hidden: [B, T, H] reference hidden states at the same positions.
        lm_head_weight: [V, H] policy LM head. ref_lm_head_weight: [V, H] reference head (default: the same).
        mask: [B, T] positions to score (chosen completion positions).
        chunk_size: positions per chunk (> 0); memory ∝ chunk_size·V.
        lm_head_bias, ref_lm_head_bias: optional [V] biases. Logit soft-capping / scaling are not supported.

    Returns:
        [B, T] float32 KL (nats, ≥ 0), 0 at unmasked positions.

    Raises:
        ValueError: ``chunk_size <= 0`` or shape mismatch.

    Source: card rrpo.md §5 option (b) (genalign design); value identical to official ``per_position_kl``.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if policy_hidden.shape != ref_hidden.shape or policy_hidden.shape[:2] != mask.shape:
        raise ValueError(
            f"shape mismatch: policy {tuple(policy_hidden.shape)}, ref {tuple(ref_hidden.shape)}, mask {tuple(mask.shape)}"
        )
    idx = mask.bool()
    hp = policy_hidden[idx]
    hr = ref_hidden.detach()[idx]
    w = lm_head_weight.float()
    wr = (lm_head_weight if ref_lm_head_weight is None else ref_lm_head_weight).detach().float()
    br = (lm_head_bias if ref_lm_head_bias is None else ref_lm_head_bias)
    br = None if br is None else br.detach()
    ckpt = _needs_grad(hp, w, lm_head_bias)
    pieces = []
    for s in range(0, hp.shape[0], chunk_size):
        args = (hp[s : s + chunk_size], hr[s : s + chunk_size], w, wr, lm_head_bias, br)
        pieces.append(checkpoint(_kl_chunk, *args, use_reentrant=False) if ckpt else _kl_chunk(*args))
    flat = torch.cat(pieces) if pieces else hp.new_zeros(0, dtype=torch.float32) + 0.0 * hp.sum()
    return torch.zeros(mask.shape, dtype=torch.float32, device=flat.device).masked_scatter(idx, flat)


def token_logps_chunked(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    target_ids: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int = 1024,
    lm_head_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token ``log π(target_t | ·)`` from hidden states, chunked like :func:`token_kl_chunked`.

    Args:
        hidden: [B, T, H] final hidden states (position t predicts ``target_ids[:, t]``).
        lm_head_weight: [V, H]. lm_head_bias: optional [V].
        target_ids: [B, T] int64 next-token ids. mask: [B, T] positions to score.
        chunk_size: positions per chunk (> 0).

    Returns:
        [B, T] float32 log-probs (nats, ≤ 0), 0 at unmasked positions.

    Raises:
        ValueError: ``chunk_size <= 0``.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    idx = mask.bool()
    h = hidden[idx]
    ids = target_ids[idx]
    w = lm_head_weight.float()
    ckpt = _needs_grad(h, w, lm_head_bias)
    pieces = []
    for s in range(0, h.shape[0], chunk_size):
        args = (h[s : s + chunk_size], w, lm_head_bias, ids[s : s + chunk_size])
        pieces.append(checkpoint(_logp_chunk, *args, use_reentrant=False) if ckpt else _logp_chunk(*args))
    flat = torch.cat(pieces) if pieces else h.new_zeros(0, dtype=torch.float32) + 0.0 * h.sum()
    return torch.zeros(mask.shape, dtype=torch.float32, device=flat.device).masked_scatter(idx, flat)


# Segment-id extraction (tags / token diffs) is data processing: it lives in genalign.data.segments and is
# re-exported here for convenience.
from genalign.data.segments import (  # noqa: E402,F401
    segment_ids_from_diff,
    segment_ids_from_tags,
    strip_tag_tokens,
    tag_token_variants,
)

from genalign.objectives.rpo import LMObjective  # noqa: E402
from genalign.registry import objectives as OBJECTIVES  # noqa: E402


@OBJECTIVES.register("rrpo", "RRPO: sub-sequence rewards + token-wise KL (Sarkar & Etemad, NeurIPS 2025), on TRL")
class RRPO(LMObjective):
    loss_type = "rrpo"
