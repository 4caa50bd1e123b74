"""Per-token log-probs and token KL through an LM head, from final hidden states, in chunks of positions.

LM verbs shared by the language-model objectives and the TRL trainer: read a model's output projection
(:func:`lm_head_params`), run the backbone only (:func:`add_hidden_state_forward`), and project hidden states
through the head a chunk of positions at a time so ``[B, L, V]`` logits never exist at once.

:func:`token_stats_chunked` is the one-pass form (issue 16 item 2): per chunk of completion positions it projects
the policy and the reference hidden states once each, takes the log-prob of the target token and — on the chosen
rows — the full-vocabulary ``KL(π_ref ‖ π_θ)``, and stores the H-sized gradient directions of both terms, so the
backward pass needs no LM-head matmul and the reference logits are never recomputed.

Conventions: hidden states ``[B, T, H]`` already shifted (position t predicts ``targets[:, t]``); masks bool;
arithmetic float32.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["lm_head_params", "add_hidden_state_forward", "token_logps_chunked", "token_kl_chunked",
           "token_stats_chunked"]


def lm_head_params(model):
    """``(weight [V, H], bias [V] or None)`` of a (PEFT-wrapped) model's output embedding.

    Raises:
        NotImplementedError: the model scales or soft-caps its logits (a head-only projection would be wrong).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model
    cfg = base.config.get_text_config()
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                 "logits_scaling"):
        v = getattr(cfg, attr, None)
        if v is not None and v != 1.0:
            raise NotImplementedError(f"chunked LM-head projection does not support {attr}={v} "
                                      f"(model {type(base).__name__})")
    head = base.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def add_hidden_state_forward(model) -> None:
    """Patch ``model.forward`` so ``model(..., return_last_hidden_state=True)`` returns only the backbone's final
    hidden states (``.last_hidden_state`` [B, L, H], after the final norm) — no logits. Any other call goes to the
    previous forward (e.g. TRL's fused head). Patch the base model under PEFT, as TRL's ``add_fused_lm_head`` does.
    Library: transformers ``BaseModelOutput``."""
    from transformers.modeling_outputs import BaseModelOutput  # transformers is heavy; only LM runs need it

    if getattr(model, "_genalign_hidden_forward", False):
        return
    prev = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, return_last_hidden_state=False, **kwargs):
        if not return_last_hidden_state:
            return prev(*args, **kwargs)
        for k in ("labels", "shift_labels", "num_items_in_batch", "fused_lm_head", "output_hidden_states",
                  "output_attentions", "return_dict", "logits_to_keep"):
            kwargs.pop(k, None)
        kwargs["use_cache"] = False
        out = self.base_model(*args, **kwargs)
        return BaseModelOutput(last_hidden_state=out.last_hidden_state)

    model.forward = types.MethodType(forward, model)
    model._genalign_hidden_forward = True


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


def _scatter(mask: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=torch.float32, device=flat.device).masked_scatter(mask, flat)


def token_kl_chunked(policy_hidden: torch.Tensor, ref_hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                     mask: torch.Tensor, chunk_size: int = 1024, ref_lm_head_weight: torch.Tensor | None = None,
                     lm_head_bias: torch.Tensor | None = None, ref_lm_head_bias: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Full-vocabulary per-position ``KL(π_ref ‖ π_θ)`` from final hidden states, ``chunk_size`` positions at a time.

    Only masked positions are projected; each chunk runs under activation checkpointing, so no more than
    ``chunk_size × V`` logits are held (recomputed in backward). Gradients flow to ``policy_hidden`` (and
    ``lm_head_weight`` if it requires grad); the reference side is detached.

    Args:
        policy_hidden: [B, T, H] policy final hidden states, position t predicting token t+1 (already shifted).
        ref_hidden: [B, T, H] reference hidden states at the same positions.
        lm_head_weight: [V, H] policy LM head. ref_lm_head_weight: [V, H] reference head (default: the same).
        mask: [B, T] positions to score (chosen completion positions).
        chunk_size: positions per chunk (> 0); memory ∝ chunk_size·V.
        lm_head_bias, ref_lm_head_bias: optional [V] biases.

    Returns:
        [B, T] float32 KL (nats, ≥ 0), 0 at unmasked positions.

    Raises:
        ValueError: ``chunk_size <= 0`` or shape mismatch.

    Source: card rrpo.md §5 option (b); value identical to the official ``per_position_kl``.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if policy_hidden.shape != ref_hidden.shape or policy_hidden.shape[:2] != mask.shape:
        raise ValueError(f"shape mismatch: policy {tuple(policy_hidden.shape)}, ref {tuple(ref_hidden.shape)}, "
                         f"mask {tuple(mask.shape)}")
    idx = mask.bool()
    hp, hr = policy_hidden[idx], ref_hidden.detach()[idx]
    w = lm_head_weight.float()
    wr = (lm_head_weight if ref_lm_head_weight is None else ref_lm_head_weight).detach().float()
    br = lm_head_bias if ref_lm_head_bias is None else ref_lm_head_bias
    br = None if br is None else br.detach()
    ckpt = _needs_grad(hp, w, lm_head_bias)
    pieces = []
    for s in range(0, hp.shape[0], chunk_size):
        args = (hp[s: s + chunk_size], hr[s: s + chunk_size], w, wr, lm_head_bias, br)
        pieces.append(checkpoint(_kl_chunk, *args, use_reentrant=False) if ckpt else _kl_chunk(*args))
    flat = torch.cat(pieces) if pieces else hp.new_zeros(0, dtype=torch.float32) + 0.0 * hp.sum()
    return _scatter(idx, flat)


def token_logps_chunked(hidden: torch.Tensor, lm_head_weight: torch.Tensor, target_ids: torch.Tensor,
                        mask: torch.Tensor, chunk_size: int = 1024, lm_head_bias: torch.Tensor | None = None
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
    h, ids = hidden[idx], target_ids[idx]
    w = lm_head_weight.float()
    ckpt = _needs_grad(h, w, lm_head_bias)
    pieces = []
    for s in range(0, h.shape[0], chunk_size):
        args = (h[s: s + chunk_size], w, lm_head_bias, ids[s: s + chunk_size])
        pieces.append(checkpoint(_logp_chunk, *args, use_reentrant=False) if ckpt else _logp_chunk(*args))
    flat = torch.cat(pieces) if pieces else h.new_zeros(0, dtype=torch.float32) + 0.0 * h.sum()
    return _scatter(idx, flat)


class _LogpKL(torch.autograd.Function):
    """One chunk: policy log-prob of the targets and (where ``with_kl``) KL(π_ref‖π_θ), with analytic gradients.

    d logp_t / d z = onehot(t) − p and d KL / d z = p − q (z: policy logits, p = softmax z, q: reference), so
    d/dh = (W[t] − p W) and (p W − q W): two H-vectors per position stored in forward; backward is elementwise.
    """

    @staticmethod
    def forward(ctx, h, w, b, hr, wr, br, ids, with_kl):
        z = _linear32(h, w, b)
        lp = torch.log_softmax(z, dim=-1)
        logp = lp.gather(-1, ids[:, None])[:, 0]
        p = lp.exp()
        pw = p @ w  # [n, H]
        g_logp = w[ids] - pw
        lq = torch.log_softmax(_linear32(hr, wr, br), dim=-1)  # reference: projected once, never in backward
        ref_logp = lq.gather(-1, ids[:, None])[:, 0]
        kl = torch.zeros_like(logp)
        g_kl = torch.zeros_like(g_logp)
        if bool(with_kl.any()):
            k = with_kl
            q = lq[k].exp()
            kl[k] = (q * (lq[k] - lp[k])).sum(-1)
            g_kl[k] = pw[k] - q @ w
        ctx.save_for_backward(g_logp, g_kl)
        ctx.h_dtype = h.dtype
        return logp, ref_logp, kl

    @staticmethod
    def backward(ctx, d_logp, d_ref, d_kl):
        g_logp, g_kl = ctx.saved_tensors
        dh = d_logp[:, None] * g_logp + d_kl[:, None] * g_kl
        return dh.to(ctx.h_dtype), None, None, None, None, None, None, None


def token_stats_chunked(policy_hidden: torch.Tensor, ref_hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                        target_ids: torch.Tensor, mask: torch.Tensor, kl_rows: int, chunk_size: int = 1024,
                        lm_head_bias: torch.Tensor | None = None, ref_lm_head_weight: torch.Tensor | None = None,
                        ref_lm_head_bias: torch.Tensor | None = None):
    """Policy and reference per-token log-probs of all rows and the token KL of the first ``kl_rows`` rows, in one
    chunked pass (each position projected once per model; no LM-head matmul in backward).

    Args:
        policy_hidden, ref_hidden: [R, T, H] hidden states (position t predicts ``target_ids[:, t]``); the reference
            is detached. lm_head_weight: [V, H] (frozen: a head that requires grad, or a bias that does, falls back
            to :func:`token_logps_chunked` + :func:`token_kl_chunked`). target_ids: [R, T]. mask: [R, T].
        kl_rows: KL is computed on rows ``< kl_rows`` (RRPO: the chosen half, B of 2B rows).
        chunk_size: positions per chunk (> 0); memory ∝ chunk_size·V.
        lm_head_bias, ref_lm_head_weight, ref_lm_head_bias: optional; the reference head defaults to the policy's.

    Returns:
        ``(logps [R, T], ref_logps [R, T], kl [kl_rows, T])`` float32, 0 at unmasked positions. Values equal the
        dense ``log_softmax`` computation (tests); gradients reach ``policy_hidden`` only.

    Raises:
        ValueError: ``chunk_size <= 0`` or shape mismatch.

    Source: genalign (issue 16 item 2); the math is card rrpo.md §2 (KL direction ref‖policy, full vocabulary).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if (policy_hidden.shape != ref_hidden.shape or policy_hidden.shape[:2] != mask.shape
            or mask.shape != target_ids.shape):
        raise ValueError(f"shape mismatch: policy {tuple(policy_hidden.shape)}, ref {tuple(ref_hidden.shape)}, "
                         f"mask {tuple(mask.shape)}")
    mask = mask.bool()
    wr = lm_head_weight if ref_lm_head_weight is None else ref_lm_head_weight
    br = lm_head_bias if ref_lm_head_bias is None else ref_lm_head_bias
    if _needs_grad(lm_head_weight, lm_head_bias):  # full fine-tune of the head: gradients w.r.t. W need logits
        logps = token_logps_chunked(policy_hidden, lm_head_weight, target_ids, mask, chunk_size, lm_head_bias)
        with torch.no_grad():
            ref_logps = token_logps_chunked(ref_hidden, wr, target_ids, mask, chunk_size, br)
        kl = token_kl_chunked(policy_hidden[:kl_rows], ref_hidden[:kl_rows], lm_head_weight, mask[:kl_rows],
                              chunk_size, wr, lm_head_bias, br)
        return logps, ref_logps, kl
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)
    h, hr, ids = policy_hidden[mask], ref_hidden.detach()[mask], target_ids[mask]
    with_kl = rows[mask] < kl_rows
    w = lm_head_weight.detach().float()
    wr = wr.detach().float()
    b = None if lm_head_bias is None else lm_head_bias.detach()
    br = None if br is None else br.detach()
    out = [[], [], []]
    for s in range(0, h.shape[0], chunk_size):
        sl = slice(s, s + chunk_size)
        for o, v in zip(out, _LogpKL.apply(h[sl], w, b, hr[sl], wr, br, ids[sl], with_kl[sl])):
            o.append(v)
    if not out[0]:
        z = h.new_zeros(0, dtype=torch.float32) + 0.0 * h.sum()
        out = [[z], [z.detach()], [z]]
    logp, ref_logp, kl = (torch.cat(o) for o in out)
    kl_full = _scatter(mask, kl)[:kl_rows]
    return _scatter(mask, logp), _scatter(mask, ref_logp.detach()), kl_full
