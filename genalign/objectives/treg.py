"""T-REG: preference optimisation with token-level reward regularisation (DPO-REG and SimPO-REG).

Paper: Zhou, Zhang, Zhao, Meng, *T-REG: Preference Optimization with Token-Level Reward Regularization*,
arXiv 2412.02685, ACL 2025. The official code could not be read; the equations follow card treg.md §2 (paper
notes, identities re-derived with autograd). Unverified details are keyword arguments whose defaults are
genalign **reconstructions / recommendations** (marked so in each docstring).

Pure functions on per-token log-probabilities; no model calls. Layout per side: ``[B, T]`` token tensors with a
``[B, T]`` completion mask (prompt and padding positions are 0). All arithmetic is float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import copy
from typing import Literal

from pydantic import Field

from genalign.objectives.lm_base import LMLossOutput, LMObjective, LMParams, TokenForward, masked_sum
from genalign.pipelines.language import reference_mode, tokenize_like_trl, tokenize_text
from genalign.registry import objectives as OBJECTIVES

__all__ = [
    "treg_loss",
    "simpo_treg_loss",
    "token_rewards_from_contrastive_prompts",
    "gather_token_logps",
    "REG_FORMS",
    "compute_token_rewards",
    "TREG",
    "DEFAULT_BETTER_TEMPLATE",
    "DEFAULT_WORSE_TEMPLATE",
]

REG_FORMS = ("logp", "ratio")


def gather_token_logps(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] in float32.

    Args:
        logits: [B, T, V] logits already aligned with ``target_ids`` (position t scores ``target_ids[:, t]``).
        target_ids: [B, T] int64 token ids; negative ids (e.g. −100 padding) give 0.

    Returns:
        [B, T] log-probabilities (nats, ≤ 0).
    """
    logps = torch.log_softmax(logits.float(), dim=-1)
    safe = target_ids.clamp(min=0)
    out = logps.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(target_ids >= 0, out, torch.zeros_like(out))


def token_rewards_from_contrastive_prompts(
    better: torch.Tensor,
    worse: torch.Tensor,
    mask: torch.Tensor | None = None,
    target_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Self-generated token rewards ``r̂_t = σ(log π_0(y_t|x_better, y_<t) − log π_0(y_t|x_worse, y_<t)) − ½``.

    Args:
        better, worse: either per-token log-probs [B, T] of the response tokens under the "make it better" and
            "make it worse" revision prompts, or — when ``target_ids`` is given — the corresponding logits
            [B, T, V] aligned with ``target_ids``.
        mask: optional [B, T] response-token mask; rewards are 0 elsewhere.
        target_ids: optional [B, T] response token ids (switches the inputs to logits).

    Returns:
        [B, T] float32 rewards in the open interval (−0.5, 0.5); 0 at masked positions.

    Raises:
        ValueError: if ``better`` and ``worse`` shapes differ.

    Source: T-REG §3 (contrastive prompting), card treg.md §2.1 [2nd]. No further normalisation
    (**[unknown → rec.]**: none reported).
    """
    if better.shape != worse.shape:
        raise ValueError(f"better {tuple(better.shape)} and worse {tuple(worse.shape)} shapes differ")
    if target_ids is not None:
        better = gather_token_logps(better, target_ids)
        worse = gather_token_logps(worse, target_ids)
    r = torch.sigmoid(better.float() - worse.float()) - 0.5
    if mask is not None:
        r = torch.where(mask.bool(), r, torch.zeros_like(r))
    return r


def _seq(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] from either a [B] sum or a [B, T] per-token tensor."""
    return x.float() if x.dim() == 1 else masked_sum(x, mask)


def treg_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_token_rewards: torch.Tensor,
    rejected_token_rewards: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    beta: float = 0.1,
    alpha: float = 0.25,
    reg_form: str = "logp",
    return_details: bool = False,
):
    """DPO-REG: ``L = L_DPO + α·w·(L_REG(y_w) + L_REG(y_l))`` per pair.

    With ℓ_t = log π_θ(y_t|·) − log π_ref(y_t|·), r(x, y) = β·Σ_t ℓ_t:

    - ``L_DPO = −logσ(r_w − r_l)``;
    - ``w = sg[σ(r_l − r_w)]`` (the DPO gradient weight, detached);
    - ``L_REG(y) = −β·Σ_t r̂_t·log π_θ(y_t|·)`` (``reg_form="logp"``) or ``−β·Σ_t r̂_t·ℓ_t`` (``"ratio"``: different
      value, identical gradient); r̂ is a constant.

    So ∂(L − L_DPO)/∂log π_θ(y_t) = −α·w·β·r̂_t.

    Args:
        policy_chosen_logps, policy_rejected_logps: [B, T] per-token policy log-probs of the completion tokens.
        ref_chosen_logps, ref_rejected_logps: reference log-probs, either [B] sums or [B, T] per token (detached).
            ``reg_form="ratio"`` needs the per-token form.
        chosen_token_rewards, rejected_token_rewards: [B, T] r̂ in (−0.5, 0.5) on the same positions (detached).
        chosen_mask, rejected_mask: [B, T] completion masks.
        beta: β > 0. **[unknown → rec.]** T-REG's own β was not retrieved; genalign's recipe uses 0.01 for
            Llama-3-8B-Instruct (card §3), the function default 0.1 follows TRL.
        alpha: α ≥ 0, regulariser weight. **[unknown → rec.]** the paper tunes α ∈ {0.1, 0.25, 0.5}; default 0.25
            is genalign's recommendation (middle of the grid).
        reg_form: ``"logp"`` (default, card) or ``"ratio"`` — reconstruction option.
        return_details: also return a dict of per-pair terms (``dpo``, ``reg_chosen``, ``reg_rejected``, ``weight``).

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])`` (+ details dict if requested); rewards r_w, r_l
        detached.

    Raises:
        ValueError: unknown ``reg_form``, ``beta <= 0``, or ``reg_form="ratio"`` with sequence-level references.

    Source: T-REG Eq. for DPO-REG, card treg.md §2.2 [2nd; identities recon-checked].
    """
    if reg_form not in REG_FORMS:
        raise ValueError(f"unknown reg_form {reg_form!r}; expected one of {REG_FORMS}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    ref_c = ref_chosen_logps.detach()
    ref_r = ref_rejected_logps.detach()
    r_w = beta * (masked_sum(policy_chosen_logps, chosen_mask) - _seq(ref_c, chosen_mask))
    r_l = beta * (masked_sum(policy_rejected_logps, rejected_mask) - _seq(ref_r, rejected_mask))
    dpo = -F.logsigmoid(r_w - r_l)
    w = torch.sigmoid(r_l - r_w).detach()

    if reg_form == "logp":
        tok_c, tok_r = policy_chosen_logps.float(), policy_rejected_logps.float()
    else:
        if ref_c.dim() != 2 or ref_r.dim() != 2:
            raise ValueError("reg_form='ratio' needs per-token reference log-probs [B, T]")
        tok_c = policy_chosen_logps.float() - ref_c.float()
        tok_r = policy_rejected_logps.float() - ref_r.float()
    reg_c = -beta * masked_sum(chosen_token_rewards.detach().float() * tok_c, chosen_mask)
    reg_r = -beta * masked_sum(rejected_token_rewards.detach().float() * tok_r, rejected_mask)
    losses = dpo + alpha * w * (reg_c + reg_r)
    out = (losses, r_w.detach(), r_l.detach())
    if return_details:
        return out + ({"dpo": dpo.detach(), "reg_chosen": reg_c.detach(), "reg_rejected": reg_r.detach(),
                       "weight": w},)
    return out


def simpo_treg_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_token_rewards: torch.Tensor,
    rejected_token_rewards: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    beta: float = 10.0,
    gamma: float = 3.0,
    alpha: float = 0.25,
    return_details: bool = False,
):
    """SimPO-REG (reference-free): ρ_t = (β/|y|)·log π_θ(y_t|·), r = Σ_t ρ_t,
    ``L = −logσ(r_w − r_l − γ) + α·w·(L_REG(y_w) + L_REG(y_l))``, ``w = sg[σ(r_l − r_w + γ)]``,
    ``L_REG(y) = −Σ_t r̂_t·ρ_t``.

    Args:
        policy_chosen_logps, policy_rejected_logps: [B, T] per-token policy log-probs.
        chosen_token_rewards, rejected_token_rewards, chosen_mask, rejected_mask: [B, T].
        beta: β (SimPO Llama-3 recipe 10 [code]). gamma: target margin γ (recipe γ/β = 0.3 → 3 [code]).
        alpha: regulariser weight (**[unknown → rec.]** 0.25).

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])`` (+ details dict).

    Source: card treg.md §2.3 — **[recon: natural reading]** of the paper's SimPO-REG.
    """
    len_c = chosen_mask.float().sum(1).clamp(min=1.0)
    len_r = rejected_mask.float().sum(1).clamp(min=1.0)
    r_w = beta * masked_sum(policy_chosen_logps, chosen_mask) / len_c
    r_l = beta * masked_sum(policy_rejected_logps, rejected_mask) / len_r
    seq = -F.logsigmoid(r_w - r_l - gamma)
    w = torch.sigmoid(r_l - r_w + gamma).detach()
    reg_c = -(beta / len_c) * masked_sum(chosen_token_rewards.detach().float() * policy_chosen_logps.float(), chosen_mask)
    reg_r = -(beta / len_r) * masked_sum(
        rejected_token_rewards.detach().float() * policy_rejected_logps.float(), rejected_mask
    )
    losses = seq + alpha * w * (reg_c + reg_r)
    out = (losses, r_w.detach(), r_l.detach())
    if return_details:
        return out + ({"simpo": seq.detach(), "reg_chosen": reg_c.detach(), "reg_rejected": reg_r.detach(),
                       "weight": w},)
    return out


# --------------------------------------------------------------------------------------------------- token rewards
# T-REG contrastive prompts: exact wording unknown → genalign recommendation (card treg.md §2.1).
DEFAULT_BETTER_TEMPLATE = (
    "Revise the response to the request below so that it is more helpful, correct, coherent and concise.\n\n"
    "Request: {prompt}\n\nRevised response: "
)
DEFAULT_WORSE_TEMPLATE = (
    "Revise the response to the request below so that it is unhelpful, incorrect, incoherent and verbose.\n\n"
    "Request: {prompt}\n\nRevised response: "
)


def _context(prompt, template: str) -> str | list:
    if isinstance(prompt, str):
        return template.format(prompt=prompt)
    # conversational: rewrite the last user turn with the revision instruction (recommendation)
    msgs = copy.deepcopy(prompt)
    last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    msgs[last]["content"] = template.format(prompt=msgs[last]["content"])
    return msgs


@torch.no_grad()
def compute_token_rewards(model, tokenizer, dataset, better_template: str = DEFAULT_BETTER_TEMPLATE,
                          worse_template: str = DEFAULT_WORSE_TEMPLATE, batch_size: int = 8, device=None,
                          store_token_ids: bool = True):
    """T-REG token rewards by contrastive prompting with the frozen initial model (offline, once).

    For every row and both completions, the trainer's completion token ids (``tokenize_like_trl``) are
    teacher-forced after a "make it better" context and after a "make it worse" context built from the prompt; the
    reward of token t is ``σ(log π_0(y_t|x_better, y_<t) − log π_0(y_t|x_worse, y_<t)) − ½``.

    Args:
        model: the frozen initial policy π_0 (a ``PeftModel`` is evaluated with adapters disabled).
        tokenizer: the tokenizer the trainer will use.
        dataset: ``datasets.Dataset`` (or list of dicts) with ``prompt``, ``chosen``, ``rejected``.
        better_template, worse_template: contexts with a ``{prompt}`` placeholder. **[unknown → rec.]**: the
            paper's wording was not retrievable (card treg.md §2.1); record them in the run card.
        batch_size: sequences per forward. device: defaults to the model's device.
        store_token_ids: also store ``{side}_token_reward_ids`` so the trainer can verify the alignment.

    Returns:
        ``datasets.Dataset`` with ``chosen_token_rewards`` / ``rejected_token_rewards`` (lists of floats in
        (−0.5, 0.5), one per completion token).

    Raises:
        ValueError: a template without ``{prompt}``.

    Source: T-REG §3 (contrastive prompting), card treg.md §2.1.
    """
    from datasets import Dataset

    for t in (better_template, worse_template):
        if "{prompt}" not in t:
            raise ValueError("templates need a {prompt} placeholder")
    if not isinstance(dataset, Dataset):
        dataset = Dataset.from_list(list(dataset))
    device = device or next(model.parameters()).device
    rows = [dict(r) for r in dataset]
    items = []  # (row index, side, better context ids, worse context ids, completion ids)
    for i, ex in enumerate(rows):
        ids = tokenize_like_trl(tokenizer, ex)
        ctx = [tokenize_text(tokenizer, _context(ex["prompt"], tpl), add_generation_prompt=True) for tpl in (better_template, worse_template)]
        for side in ("chosen", "rejected"):
            items.append((i, side, ctx[0], ctx[1], ids[f"{side}_ids"]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results, ids_out = {}, {}
    with reference_mode(model):
        for s in range(0, len(items), batch_size):
            chunk = items[s: s + batch_size]
            seqs, starts = [], []
            for _, _, cb, cw, y in chunk:
                for ctx in (cb, cw):
                    seqs.append(ctx + y)
                    starts.append(len(ctx))
            width = max(map(len, seqs))
            input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            attn = torch.zeros_like(input_ids)
            for j, sq in enumerate(seqs):
                input_ids[j, : len(sq)] = torch.tensor(sq)
                attn[j, : len(sq)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attn.to(device), use_cache=False).logits
            logps = torch.log_softmax(logits.float()[:, :-1], -1).gather(-1, input_ids.to(device)[:, 1:, None])[..., 0]
            for k, (i, side, _, _, y) in enumerate(chunk):
                lb = logps[2 * k, starts[2 * k] - 1: starts[2 * k] - 1 + len(y)]
                lw = logps[2 * k + 1, starts[2 * k + 1] - 1: starts[2 * k + 1] - 1 + len(y)]
                results[(i, side)] = token_rewards_from_contrastive_prompts(lb, lw).cpu().tolist()
                ids_out[(i, side)] = list(y)
    out = dataset
    for side in ("chosen", "rejected"):
        cols = [(f"{side}_token_rewards", results)] + ([(f"{side}_token_reward_ids", ids_out)] if store_token_ids else [])
        for col, src in cols:
            if col in out.column_names:
                out = out.remove_columns(col)
            out = out.add_column(col, [src[(i, side)] for i in range(len(rows))])
    return out


# --------------------------------------------------------------------------------------------------- objective
@OBJECTIVES.register("treg", "T-REG: DPO + token-level reward regularisation (Zhou et al., ACL 2025), on TRL")
class TREG(LMObjective):
    """DPO-REG (:func:`treg_loss`) with token rewards computed once by contrastive prompting (:meth:`prepare_rows`)."""

    class Config(LMParams):
        """β, α (**[unknown → rec.]** 0.25, paper grid {0.1, 0.25, 0.5}), ``reg_form`` (**[recon]**), and the
        contrastive-prompting templates / batch size used to compute token rewards when rows lack them."""

        beta: float = Field(0.1, gt=0)
        alpha: float = Field(0.25, ge=0)
        reg_form: Literal["logp", "ratio"] = "logp"
        better_template: str = DEFAULT_BETTER_TEMPLATE
        worse_template: str = DEFAULT_WORSE_TEMPLATE
        token_reward_batch_size: int = Field(8, ge=1)

    def token_fields(self):
        return {"token_rewards": ("chosen_token_rewards", "rejected_token_rewards", 0.0)}

    def prepare_rows(self, dataset, model, tokenizer):
        if "chosen_token_rewards" in dataset.column_names:
            return dataset
        c = self.config
        return compute_token_rewards(model, tokenizer, dataset, c.better_template, c.worse_template,
                                     c.token_reward_batch_size)

    def prepare_dataset(self, dataset, processing_class, name, counts):
        missing = {"chosen_token_rewards", "rejected_token_rewards"} - set(dataset.column_names)
        if missing:
            raise ValueError(f"{name} dataset lacks {sorted(missing)}; run compute_token_rewards() first")
        has_ids = "chosen_token_reward_ids" in dataset.column_names
        for ex in dataset:
            for side in ("chosen", "rejected"):
                n_r, n_t = len(ex[f"{side}_token_rewards"]), len(ex[f"{side}_ids"])
                if n_r != n_t:
                    raise ValueError(f"{name} row {ex['row_id']}: {side}_token_rewards has {n_r} values but "
                                     f"TRL tokenised the {side} completion into {n_t} tokens")
                if has_ids and list(ex[f"{side}_token_reward_ids"]) != list(ex[f"{side}_ids"]):
                    raise ValueError(f"{name} row {ex['row_id']}: token rewards were computed on different "
                                     f"{side} token ids than the trainer's")
        return dataset

    def lm_loss(self, fwd: TokenForward) -> LMLossOutput:
        c = self.config
        _, (pc, pr, rc_tok, rr_tok, mc, mr) = self.sequence_logps(fwd)
        logps, ref_logps, ref_sums = fwd.token_logps()
        if c.reg_form == "ratio" and rc_tok is None:
            raise ValueError("reg_form='ratio' needs per-token reference log-probs (precompute_ref_log_probs=False)")
        ref_c = rc_tok if rc_tok is not None else ref_sums[0]
        ref_r = rr_tok if rr_tok is not None else ref_sums[1]
        tr_c, tr_r = self.split(fwd.field("token_rewards").float())
        losses, cw, cl, d = treg_loss(pc, pr, ref_c, ref_r, tr_c, tr_r, mc, mr, beta=c.beta, alpha=c.alpha,
                                      reg_form=c.reg_form, return_details=True)
        reg = d["reg_chosen"] + d["reg_rejected"]
        return LMLossOutput(losses, cw, cl, {"pref_loss": d["dpo"], "treg/reg": reg,
                                             "treg/reg_weighted": c.alpha * d["weight"] * reg,
                                             "treg/weight": d["weight"]})
