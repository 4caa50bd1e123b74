"""TRL ``DPOTrainer`` subclasses for T-REG, RRPO and the DPO / RPO / f-DPO baselines.

Supported TRL versions: **1.16.x** (``>=1.16.0,<1.17``). The subclasses override TRL's private
``DPOTrainer._compute_loss`` (the only hook in 1.16: forward, reference forward, loss zoo and metrics live in that
one method — card treg.md §5), plus ``_prepare_dataset`` / ``_set_signature_columns_if_needed`` /
``compute_ref_log_probs``. Private APIs change between minor releases, so the version is checked at import time
(set ``GENALIGN_SKIP_TRL_VERSION_CHECK=1`` to bypass at your own risk).

What is reused from TRL: dataset tokenisation (prompt/completion split at the common prefix, EOS handling), the
``[chosen; rejected]`` right-padded batch layout, the fused LM head that returns per-token log-probs without
materialising logits, the PEFT adapter-off reference, Accelerate / DeepSpeed / FSDP preparation, logging.

- :class:`PreferenceTrainer` — ``loss_type`` ∈ {``dpo``, ``rpo``, ``fdpo``} (sequence-level, genalign's pure losses).
- :class:`TRegTrainer` — ``loss_type="treg"`` (DPO-REG) with stored token rewards (also runs the baselines).
- :class:`RRPOTrainer` — ``loss_type="rrpo"``: per-token log-probs and the full-vocabulary token KL computed from
  final hidden states in chunks (card rrpo.md §5 option b).
- :func:`compute_token_rewards` — offline T-REG token rewards from the frozen initial model.
- :func:`run_lm_training` — end-to-end run from a plain config dict.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import os
import random
import types
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from packaging.version import Version

logger = logging.getLogger(__name__)

TRL_MIN, TRL_MAX = "1.16.0", "1.17.0"


def _check_trl_version() -> None:
    try:
        import trl
    except ImportError as err:  # pragma: no cover - exercised only without trl
        raise ImportError(
            f"genalign.training.trl_trainers needs TRL >={TRL_MIN},<{TRL_MAX}: pip install 'trl>={TRL_MIN},<{TRL_MAX}'"
        ) from err
    v = Version(trl.__version__)
    if not (Version(TRL_MIN) <= v < Version(TRL_MAX)) and not os.environ.get("GENALIGN_SKIP_TRL_VERSION_CHECK"):
        raise ImportError(
            f"genalign.training.trl_trainers supports TRL >={TRL_MIN},<{TRL_MAX} (it overrides the private "
            f"DPOTrainer._compute_loss), found trl=={trl.__version__}. Install a supported version with "
            f"pip install 'trl>={TRL_MIN},<{TRL_MAX}', or set GENALIGN_SKIP_TRL_VERSION_CHECK=1 to try anyway."
        )


_check_trl_version()

import torch.nn.functional as F  # noqa: E402
from accelerate.utils import is_peft_model  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers.modeling_outputs import BaseModelOutput  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.data_utils import _tokenize, common_prefix_length, is_conversational  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference  # noqa: E402
from trl.trainer.utils import use_adapter  # noqa: E402

from genalign.objectives.rpo import F_DIVERGENCES, SFT_REDUCTIONS, fdpo_loss, masked_sum, rpo_loss  # noqa: E402
from genalign.objectives.rrpo import (  # noqa: E402
    rrpo_loss,
    segment_ids_from_diff,
    segment_ids_from_tags,
    tag_token_variants,
    token_kl_chunked,
    token_logps_chunked,
)
from genalign.objectives.treg import REG_FORMS, token_rewards_from_contrastive_prompts, treg_loss  # noqa: E402

__all__ = [
    "ObjectiveArgs",
    "TokenFieldCollator",
    "PreferenceTrainer",
    "TRegTrainer",
    "RRPOTrainer",
    "compute_token_rewards",
    "tokenize_like_trl",
    "run_lm_training",
    "make_arithmetic_preference_rows",
    "DEFAULT_BETTER_TEMPLATE",
    "DEFAULT_WORSE_TEMPLATE",
]

LOSS_TYPES = ("dpo", "rpo", "fdpo", "treg", "rrpo")
TAG_COLUMNS = (("chosen_masked", "rejected_masked"), ("answer_masked", "pred_masked"))

# T-REG contrastive prompts: exact wording unknown → genalign recommendation (card treg.md §2.1).
DEFAULT_BETTER_TEMPLATE = (
    "Revise the response to the request below so that it is more helpful, correct, coherent and concise.\n\n"
    "Request: {prompt}\n\nRevised response: "
)
DEFAULT_WORSE_TEMPLATE = (
    "Revise the response to the request below so that it is unhelpful, incorrect, incoherent and verbose.\n\n"
    "Request: {prompt}\n\nRevised response: "
)


# --------------------------------------------------------------------------------------------------- config
@dataclass
class ObjectiveArgs:
    """Objective hyper-parameters (the ``objective:`` block of a genalign LM config).

    Attributes:
        loss_type: ``dpo`` | ``rpo`` | ``fdpo`` | ``treg`` | ``rrpo``.
        beta: β > 0; copied into ``DPOConfig.beta`` so TRL's logging uses the same value.
        alpha: regulariser weight; ``None`` → per-objective default: T-REG 0.25 (**[unknown → rec.]**, paper grid
            {0.1, 0.25, 0.5}), RRPO 0.01 (LLaVA-Video [code]). Ignored by dpo / fdpo.
        rpo_alpha: RPO NLL weight η (default 0.005, zephyr recipe [code]); ``sft_reduction``: ``sum`` | ``mean`` |
            ``batch_token_mean`` (card treg.md §2.4).
        f_divergence: ``reverse_kl`` | ``forward_kl`` | ``js_divergence`` | ``alpha_divergence``;
            ``f_alpha_coef``: TRL's ``f_alpha_divergence_coef`` (paper α = 1 − coef).
        reg_form: T-REG ``logp`` | ``ratio`` (**[recon]**, same gradient).
        kl_chunk_size: RRPO positions per LM-head chunk for the token KL / log-probs.
        segments: RRPO segment source ``auto`` (tags if tag columns exist, else diff) | ``tags`` | ``diff``.
        min_match: RRPO diff minimum matching block (1 [code]). fused_space_tags: tag variants with a fused space
            (official [code]; turn off for character-level tokenizers).
        tag_open, tag_close: phrase tags (``<MASK>``, ``</MASK>`` [code]).
    """

    loss_type: str = "dpo"
    beta: float = 0.1
    alpha: float | None = None
    rpo_alpha: float = 0.005
    sft_reduction: str = "sum"
    f_divergence: str = "reverse_kl"
    f_alpha_coef: float = 1.0
    reg_form: str = "logp"
    kl_chunk_size: int = 1024
    segments: str = "auto"
    min_match: int = 1
    fused_space_tags: bool = True
    tag_open: str = "<MASK>"
    tag_close: str = "</MASK>"

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; expected one of {LOSS_TYPES}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.sft_reduction not in SFT_REDUCTIONS:
            raise ValueError(f"sft_reduction must be one of {SFT_REDUCTIONS}")
        if self.f_divergence not in F_DIVERGENCES:
            raise ValueError(f"f_divergence must be one of {F_DIVERGENCES}")
        if self.reg_form not in REG_FORMS:
            raise ValueError(f"reg_form must be one of {REG_FORMS}")
        if self.segments not in ("auto", "tags", "diff"):
            raise ValueError("segments must be 'auto', 'tags' or 'diff'")
        if self.alpha is None:
            self.alpha = {"treg": 0.25, "rrpo": 0.01}.get(self.loss_type, 0.0)

    @classmethod
    def from_dict(cls, d: dict) -> "ObjectiveArgs":
        """Build from a config block; ``name`` is accepted as an alias of ``loss_type``; unknown keys raise."""
        d = dict(d)
        if "name" in d:
            d.setdefault("loss_type", d.pop("name"))
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown objective keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


# --------------------------------------------------------------------------------------------------- tokenisation
def tokenize_like_trl(processing_class, example: dict) -> dict:
    """Tokenise one preference row exactly as TRL 1.16 ``DPOTrainer._prepare_dataset`` does.

    Plain-text rows get the EOS token appended to ``chosen`` / ``rejected`` (if missing); the completion starts at
    the common prefix of the tokenised prompt and prompt+completion.

    Returns:
        ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` (lists of ints).
    """
    tok = getattr(processing_class, "tokenizer", processing_class)
    ex = dict(example)
    if is_conversational(ex):
        p = _tokenize(processing_class, ex["prompt"], add_generation_prompt=True)["input_ids"]
        pc = _tokenize(processing_class, ex["prompt"] + ex["chosen"])["input_ids"]
        pr = _tokenize(processing_class, ex["prompt"] + ex["rejected"])["input_ids"]
    else:
        eos = tok.eos_token
        for k in ("chosen", "rejected"):
            if not ex[k].endswith(eos):
                ex[k] = ex[k] + eos
        p = _tokenize(processing_class, ex["prompt"])["input_ids"]
        pc = _tokenize(processing_class, ex["prompt"] + ex["chosen"])["input_ids"]
        pr = _tokenize(processing_class, ex["prompt"] + ex["rejected"])["input_ids"]
    n = min(common_prefix_length(p, pc), common_prefix_length(p, pr))
    return {"prompt_ids": list(p[:n]), "chosen_ids": list(pc[n:]), "rejected_ids": list(pr[n:])}


# --------------------------------------------------------------------------------------------------- collator
@dataclass
class TokenFieldCollator(DataCollatorForPreference):
    """TRL's preference collator plus per-token side information aligned with the ``[chosen; rejected]`` layout.

    ``token_fields`` maps an output key to ``(chosen_column, rejected_column, pad_value)``; each column holds one
    value per completion token (same length as ``chosen_ids`` / ``rejected_ids``). The output tensor is ``[2B, L]``
    with the values on the completion positions, ``pad_value`` on prompt and padding positions, truncated exactly
    like ``input_ids``. It is **not** shifted: the trainer applies ``[:, 1:]`` to align with TRL's log-probs.

    Raises:
        ValueError: a row whose value count differs from its completion length (message names the row).
    """

    token_fields: dict = field(default_factory=dict)

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().torch_call(examples)
        width = out["input_ids"].shape[1]
        for key, (ck, rk, pad_value) in self.token_fields.items():
            rows = []
            for col, ids_key in ((ck, "chosen_ids"), (rk, "rejected_ids")):
                for i, ex in enumerate(examples):
                    vals = list(ex[col])
                    if len(vals) != len(ex[ids_key]):
                        raise ValueError(
                            f"row {ex.get('row_id', i)}: {col!r} has {len(vals)} values but the completion has "
                            f"{len(ex[ids_key])} tokens; side information must be computed on the trainer's tokens"
                        )
                    rows.append([pad_value] * len(ex["prompt_ids"]) + vals)
            if self.max_length is not None:
                sl = slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None)
                rows = [r[sl] for r in rows]
            dtype = torch.float32 if isinstance(pad_value, float) else torch.long
            t = torch.full((len(rows), width), pad_value, dtype=dtype)
            for j, r in enumerate(rows):
                t[j, : len(r)] = torch.tensor(r, dtype=dtype)
            out[key] = t
        return out


# --------------------------------------------------------------------------------------------------- trainers
NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "token_rewards", "segment_ids"}


def _mean(x: torch.Tensor) -> float:
    return x.float().mean().item() if x.numel() else 0.0


class PreferenceTrainer(DPOTrainer):
    """TRL ``DPOTrainer`` running genalign's pure losses (``dpo`` / ``rpo`` / ``fdpo``; subclasses add more).

    Args:
        model, ref_model, args, data_collator, train_dataset, eval_dataset, processing_class, callbacks,
            optimizers, peft_config: as ``trl.DPOTrainer`` (TRL 1.16).
        objective: :class:`ObjectiveArgs` (or dict); ``objective.beta`` overrides ``args.beta``.
        loss_type: shortcut overriding ``objective.loss_type``.

    Raises:
        ValueError: ``loss_type`` not supported by this class.

    Logged (per step, TRL names + genalign names): ``rewards/chosen|rejected|accuracies|margins``,
    ``logps/chosen|rejected``, ``pref_loss``, ``implicit_acc``, ``margin`` and objective-specific terms.
    """

    supported_loss_types: tuple[str, ...] = ("dpo", "rpo", "fdpo")
    default_loss_type = "dpo"

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, *, objective=None, loss_type=None,
                 data_collator=None, train_dataset=None, eval_dataset=None, processing_class=None,
                 callbacks=None, optimizers=(None, None), peft_config=None, **kwargs):
        if isinstance(objective, dict):
            objective = ObjectiveArgs.from_dict(objective)
        objective = objective or ObjectiveArgs(loss_type=loss_type or self.default_loss_type)
        if loss_type is not None and loss_type != objective.loss_type:
            objective = replace(objective, loss_type=loss_type, alpha=None)
        if objective.loss_type not in self.supported_loss_types:
            raise ValueError(
                f"{type(self).__name__} supports loss_type in {self.supported_loss_types}, got {objective.loss_type!r}"
            )
        self.objective = objective
        self.genalign_counts: Counter = Counter()
        args = args or DPOConfig(output_dir=f"genalign-{objective.loss_type}")
        args.beta = objective.beta
        if data_collator is None and self._token_fields():
            if processing_class is None:
                raise ValueError("pass processing_class (tokenizer) when training with per-token side information")
            tok = getattr(processing_class, "tokenizer", processing_class)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            data_collator = TokenFieldCollator(
                pad_token_id=tok.pad_token_id,
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                pad_to_multiple_of=args.pad_to_multiple_of,
                token_fields=self._token_fields(),
            )
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         callbacks=callbacks, optimizers=optimizers, peft_config=peft_config, **kwargs)

    # ------------------------------------------------------------------ data hooks
    def _token_fields(self) -> dict:
        """Per-token columns the collator must place on the batch (none for sequence-level losses)."""
        return {}

    def _extra_columns(self) -> list[str]:
        cols = ["row_id"]
        for ck, rk, _ in self._token_fields().values():
            cols += [ck, rk]
        return cols

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for c in self._extra_columns():
            if c not in self._signature_columns:
                self._signature_columns.append(c)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if isinstance(dataset, Dataset) and "row_id" not in dataset.column_names:
            dataset = dataset.add_column("row_id", list(range(len(dataset))))
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if isinstance(dataset, Dataset):
            n = len(dataset)
            dataset = dataset.filter(lambda ex: ex["chosen_ids"] != ex["rejected_ids"])
            if len(dataset) < n:
                self.genalign_counts[f"{dataset_name}/dropped_identical"] += n - len(dataset)
                logger.warning("dropped %d %s pairs with identical chosen/rejected", n - len(dataset), dataset_name)
        return dataset

    def compute_ref_log_probs(self, model, inputs):
        # TRL filters its own non-model keys; drop genalign's per-token side information too
        return super().compute_ref_log_probs(
            model, {k: v for k, v in inputs.items() if k not in ("token_rewards", "segment_ids")}
        )

    # ------------------------------------------------------------------ forward helpers
    def _ref_context(self):
        """Adapter-off (or ``ref`` adapter) context for PEFT models without a separate reference."""
        if is_peft_model(self.model) and self.ref_model is None:
            unwrapped = self.accelerator.unwrap_model(self.model)
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return contextlib.nullcontext()

    def _token_logps(self, model, inputs):
        """Per-token policy and reference log-probs through TRL's fused LM head.

        Returns:
            ``(logps [2B, L−1], ref_logps [2B, L−1] or None, ref_sums (chosen [B], rejected [B]) or None,
            shift_mask [2B, L−1], outputs)``.
        """
        model_kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[..., 1:]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        seq_len = shift_mask.size(1)
        logps = outputs.log_probs[:, -seq_len:].float()
        if self.precompute_ref_logps:
            return logps, None, (inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]), shift_mask, outputs
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            with self._ref_context():
                ref_model = self.model if self.ref_model is None else self.ref_model
                ref_out = ref_model(**model_kwargs, labels=labels, fused_lm_head=True)
        return logps, ref_out.log_probs[:, -seq_len:].float(), None, shift_mask, outputs

    def _log(self, mode: str, chosen_rewards, rejected_rewards, losses, extra: dict[str, torch.Tensor]):
        g = self.accelerator.gather_for_metrics
        cr, rr = g(chosen_rewards.detach()), g(rejected_rewards.detach())
        m = self._metrics[mode]
        m["rewards/chosen"].append(_mean(cr))
        m["rewards/rejected"].append(_mean(rr))
        m["rewards/accuracies"].append(_mean((cr > rr).float()))
        m["rewards/margins"].append(_mean(cr - rr))
        m["implicit_acc"].append(_mean((cr > rr).float()))
        m["margin"].append(_mean(cr - rr))
        m["per_pair_loss"].append(_mean(g(losses.detach())))
        for k, v in extra.items():
            m[k].append(_mean(g(v.detach().float())))

    # ------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        o = self.objective
        logps, ref_logps, ref_sums, shift_mask, outputs = self._token_logps(model, inputs)
        pc, pr = logps.chunk(2, dim=0)
        mc, mr = shift_mask.chunk(2, dim=0)
        if ref_logps is not None:
            rc_tok, rr_tok = ref_logps.chunk(2, dim=0)
            rc, rr = masked_sum(rc_tok, mc), masked_sum(rr_tok, mr)
        else:
            rc_tok = rr_tok = None
            rc, rr = ref_sums
        sc, sr = masked_sum(pc, mc), masked_sum(pr, mr)
        extra: dict[str, torch.Tensor] = {}
        if o.loss_type == "treg":
            if "token_rewards" not in inputs:
                raise ValueError("loss_type='treg' needs token rewards in the batch (columns chosen_token_rewards / "
                                 "rejected_token_rewards; see compute_token_rewards)")
            tr_c, tr_r = inputs["token_rewards"][..., 1:].float().chunk(2, dim=0)
            ref_c = rc_tok if o.reg_form == "ratio" else rc
            ref_r = rr_tok if o.reg_form == "ratio" else rr
            if ref_c is None:
                raise ValueError("reg_form='ratio' needs per-token reference log-probs (precompute_ref_log_probs=False)")
            losses, cw, cl, d = treg_loss(pc, pr, ref_c, ref_r, tr_c, tr_r, mc, mr, beta=o.beta, alpha=o.alpha,
                                          reg_form=o.reg_form, return_details=True)
            reg = d["reg_chosen"] + d["reg_rejected"]
            extra = {"pref_loss": d["dpo"], "treg/reg": reg, "treg/reg_weighted": o.alpha * d["weight"] * reg,
                     "treg/weight": d["weight"]}
        elif o.loss_type == "rpo":
            losses, cw, cl = rpo_loss(sc, sr, rc, rr, beta=o.beta, alpha=o.rpo_alpha, sft_reduction=o.sft_reduction,
                                      chosen_lengths=mc.sum(1))
            extra = {"sft_loss": -sc / mc.sum(1).clamp(min=1)}
        else:
            div = o.f_divergence if o.loss_type == "fdpo" else "reverse_kl"
            losses, cw, cl = fdpo_loss(sc, sr, rc, rr, beta=o.beta, divergence=div, alpha_coef=o.f_alpha_coef)
            extra = {"pref_loss": losses}
        loss = losses.mean()
        self._log(mode, cw, cl, losses, extra)
        g = self.accelerator.gather_for_metrics
        self._metrics[mode]["logps/chosen"].append(_mean(g(sc.detach())))
        self._metrics[mode]["logps/rejected"].append(_mean(g(sr.detach())))
        if return_outputs:  # deprecated TRL path: logits recomputed with an extra forward, as TRL does
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS})
            return loss, outputs
        return loss


class TRegTrainer(PreferenceTrainer):
    """T-REG (DPO-REG) on TRL 1.16; baselines ``dpo`` / ``rpo`` / ``fdpo`` through ``loss_type``.

    The training rows need ``chosen_token_rewards`` / ``rejected_token_rewards`` (one float per completion token of
    TRL's tokenisation — produce them with :func:`compute_token_rewards`). Token rewards are collated onto the
    completion positions of the ``[2B, L]`` layout and shifted by one to align with TRL's per-token log-probs.

    Raises:
        ValueError: token-reward length ≠ completion length (names the row), or stored reward token ids differ from
            TRL's completion ids.

    Source: T-REG (arXiv 2412.02685), card treg.md §2.2, §5.
    """

    supported_loss_types = ("treg", "dpo", "rpo", "fdpo")
    default_loss_type = "treg"

    def _token_fields(self):
        if self.objective.loss_type != "treg":
            return {}
        return {"token_rewards": ("chosen_token_rewards", "rejected_token_rewards", 0.0)}

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if self.objective.loss_type != "treg" or not isinstance(dataset, Dataset):
            return dataset
        missing = {"chosen_token_rewards", "rejected_token_rewards"} - set(dataset.column_names)
        if missing:
            raise ValueError(f"{dataset_name} dataset lacks {sorted(missing)}; run compute_token_rewards() first")
        has_ids = "chosen_token_reward_ids" in dataset.column_names
        for ex in dataset:
            for side in ("chosen", "rejected"):
                n_r, n_t = len(ex[f"{side}_token_rewards"]), len(ex[f"{side}_ids"])
                if n_r != n_t:
                    raise ValueError(f"{dataset_name} row {ex['row_id']}: {side}_token_rewards has {n_r} values but "
                                     f"TRL tokenised the {side} completion into {n_t} tokens")
                if has_ids and list(ex[f"{side}_token_reward_ids"]) != list(ex[f"{side}_ids"]):
                    raise ValueError(f"{dataset_name} row {ex['row_id']}: token rewards were computed on different "
                                     f"{side} token ids than the trainer's")
        return dataset


def _add_hidden_state_forward(model) -> None:
    """Patch ``model.forward`` so ``model(..., return_last_hidden_state=True)`` returns only the backbone's final
    hidden states ([B, L, H], after the final norm) — no logits. Any other call goes to the previous forward (TRL's
    fused head). Patched on the base model (under PEFT), like TRL's ``add_fused_lm_head``."""
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


def _lm_head(model):
    base = model.get_base_model() if is_peft_model(model) else model
    cfg = base.config.get_text_config()
    for attr, neutral in (("final_logit_softcapping", None), ("logit_scale", None), ("output_multiplier", None),
                          ("lm_head_multiplier", None), ("logits_scaling", None)):
        v = getattr(cfg, attr, None)
        if v is not None and v != neutral and v != 1.0:
            raise NotImplementedError(f"RRPO token KL does not support {attr}={v} (model {type(base).__name__})")
    head = base.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


class RRPOTrainer(PreferenceTrainer):
    """RRPO on TRL 1.16: sub-sequence (phrase) margins + token-wise KL(π_ref‖π_θ) on the chosen response.

    Segment ids come from ``<MASK>…</MASK>``-tagged copies of the responses (columns ``chosen_masked`` /
    ``rejected_masked`` or the official ``answer_masked`` / ``pred_masked``) or, without tags, from a token diff of
    the chosen and rejected completions (``objective.segments``). Pairs with no phrase are dropped and counted in
    ``genalign_counts``. The backbone runs once per model; per-token log-probs and the full-vocabulary KL are
    computed from the final hidden states through ``lm_head`` in chunks of ``objective.kl_chunk_size`` positions
    (:func:`~genalign.objectives.rrpo.token_kl_chunked`), never materialising ``[2B, L, V]`` logits.

    Video datasets (a ``video`` column) skip TRL's text tokenisation and need
    :class:`genalign.data.video.VideoPreferenceCollator` as ``data_collator``.

    Raises:
        ValueError: ``precompute_ref_log_probs=True`` (the token KL needs the full reference distribution online).
        NotImplementedError: models with logit soft-capping / scaling.

    Source: RRPO (arXiv 2504.12083), official ``pritamqu/RRPO@a905573`` ``llava/losses.py``; card rrpo.md.
    """

    supported_loss_types = ("rrpo",)
    default_loss_type = "rrpo"

    def __init__(self, *args, **kwargs):
        a = kwargs.get("args")
        if a is not None and a.precompute_ref_log_probs:
            raise ValueError("RRPO needs the reference distribution at every position; precompute_ref_log_probs must "
                             "be False (card rrpo.md §4 README)")
        ds = kwargs.get("train_dataset")
        if a is not None and isinstance(ds, Dataset) and "video" in ds.column_names:
            a.remove_unused_columns = False  # the video collator needs prompt/chosen/rejected/video
        super().__init__(*args, **kwargs)
        base = self.accelerator.unwrap_model(self.model)
        _add_hidden_state_forward(base.get_base_model() if is_peft_model(base) else base)
        if self.ref_model is not None:
            _add_hidden_state_forward(self.accelerator.unwrap_model(self.ref_model))

    def _token_fields(self):
        return {"segment_ids": ("chosen_segment_ids", "rejected_segment_ids", 0)}

    def _extra_columns(self):
        return super()._extra_columns() + ["video", "chosen_masked", "rejected_masked", "answer_masked",
                                           "pred_masked"]

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if isinstance(dataset, Dataset) and "video" in dataset.column_names:
            return dataset  # video rows are processed on the fly by VideoPreferenceCollator
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if not isinstance(dataset, Dataset):
            raise ValueError("RRPOTrainer needs a map-style Dataset to compute segment ids")
        return self._add_segment_ids(dataset, processing_class, dataset_name)

    def _add_segment_ids(self, dataset, processing_class, dataset_name):
        o = self.objective
        cols = next((c for c in TAG_COLUMNS if c[0] in dataset.column_names), None)
        mode = o.segments if o.segments != "auto" else ("tags" if cols else "diff")
        if mode == "tags" and cols is None:
            raise ValueError(f"segments='tags' needs columns {TAG_COLUMNS}")
        tok = getattr(processing_class, "tokenizer", processing_class)
        if mode == "tags":
            tag_tok = copy.deepcopy(tok)
            tag_tok.add_special_tokens({"additional_special_tokens": [o.tag_open, o.tag_close]})
            starts, ends = tag_token_variants(tag_tok, o.tag_open, o.tag_close, fused_space=o.fused_space_tags)
        statuses: Counter = Counter()

        def add(ex):
            if mode == "diff":
                sc, sr = segment_ids_from_diff(ex["chosen_ids"], ex["rejected_ids"], min_match=o.min_match)
                statuses["diff"] += 1
            else:
                segs = []
                for side, col in (("chosen", cols[0]), ("rejected", cols[1])):
                    tagged = ex[col]
                    if is_conversational(ex):
                        full = _tokenize(tag_tok, ex["prompt"] + [{"role": "assistant", "content": tagged}])["input_ids"]
                    else:
                        if not tagged.endswith(tok.eos_token) and ex[side].endswith(tok.eos_token):
                            tagged = tagged + tok.eos_token
                        full = _tokenize(tag_tok, ex["prompt"] + tagged)["input_ids"]
                    plain = list(ex["prompt_ids"]) + list(ex[f"{side}_ids"])
                    seg, status = segment_ids_from_tags(full, plain, starts, ends)
                    statuses[f"{side}/{status}"] += 1
                    segs.append(seg[len(ex["prompt_ids"]):])
                sc, sr = segs
            return {"chosen_segment_ids": sc, "rejected_segment_ids": sr}

        dataset = dataset.map(add)
        n = len(dataset)
        dataset = dataset.filter(lambda ex: any(s > 0 for s in ex["chosen_segment_ids"])
                                 or any(s > 0 for s in ex["rejected_segment_ids"]))
        for k, v in statuses.items():
            self.genalign_counts[f"{dataset_name}/segments/{k}"] += v
        if len(dataset) < n:
            self.genalign_counts[f"{dataset_name}/dropped_no_phrase"] += n - len(dataset)
            logger.warning("RRPO: dropped %d/%d %s pairs without a differing phrase", n - len(dataset), n,
                           dataset_name)
        if len(dataset) == 0:
            raise ValueError(f"RRPO: no {dataset_name} pair has a differing phrase (statuses {dict(statuses)})")
        return dataset

    def _hidden(self, model, model_kwargs):
        return model(**model_kwargs, return_last_hidden_state=True).last_hidden_state

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        o = self.objective
        model_kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[..., 1:].bool()
        L = shift_mask.size(1)
        targets = inputs["input_ids"][..., 1:]
        hidden = self._hidden(model, model_kwargs)[:, -(L + 1):-1]  # position t predicts token t+1
        w, b = _lm_head(self.accelerator.unwrap_model(self.model))
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            with self._ref_context():
                ref = self.model if self.ref_model is None else self.ref_model
                ref_hidden = self._hidden(ref, model_kwargs)[:, -(L + 1):-1]
        if self.ref_model is None:
            wr, br = w, b
        else:
            wr, br = _lm_head(self.accelerator.unwrap_model(self.ref_model))
        cs = o.kl_chunk_size
        logps = token_logps_chunked(hidden, w, targets, shift_mask, cs, b)
        with torch.no_grad():
            ref_logps = token_logps_chunked(ref_hidden, wr, targets, shift_mask, cs, br)
        B = logps.size(0) // 2
        mc, mr = shift_mask[:B], shift_mask[B:]
        kl = token_kl_chunked(hidden[:B], ref_hidden[:B], w, mc, cs, ref_lm_head_weight=wr, lm_head_bias=b,
                              ref_lm_head_bias=br)
        seg = inputs["segment_ids"][..., 1:]
        losses, cw, cl, d = rrpo_loss(logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], seg[:B], seg[B:], kl, mc,
                                      beta=o.beta, alpha=o.alpha, rejected_mask=mr, return_details=True)
        loss = losses.mean()
        self._log(mode, cw, cl, losses, {"pref_loss": d["pref"], "kl": d["kl"], "kl_weighted": o.alpha * d["kl"]})
        g = self.accelerator.gather_for_metrics
        self._metrics[mode]["logps/chosen"].append(_mean(g(masked_sum(logps[:B], mc).detach())))
        self._metrics[mode]["logps/rejected"].append(_mean(g(masked_sum(logps[B:], mr).detach())))
        if return_outputs:  # no logits are materialised on the RRPO path
            return loss, types.SimpleNamespace(logits=None)
        return loss


# --------------------------------------------------------------------------------------------------- token rewards
def _context_text(prompt, template: str, tokenizer) -> str | list:
    if isinstance(prompt, str):
        return template.format(prompt=prompt)
    # conversational: rewrite the last user turn with the revision instruction (recommendation)
    msgs = copy.deepcopy(prompt)
    last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    msgs[last]["content"] = template.format(prompt=msgs[last]["content"])
    return msgs


@torch.no_grad()
def compute_token_rewards(
    model,
    tokenizer,
    dataset,
    better_template: str = DEFAULT_BETTER_TEMPLATE,
    worse_template: str = DEFAULT_WORSE_TEMPLATE,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    store_token_ids: bool = True,
):
    """T-REG token rewards by contrastive prompting with the frozen initial model (offline, once).

    For every row and both completions, the trainer's completion token ids (:func:`tokenize_like_trl`) are
    teacher-forced after a "make it better" context and after a "make it worse" context built from the prompt; the
    reward of token t is ``σ(log π_0(y_t|x_better, y_<t) − log π_0(y_t|x_worse, y_<t)) − ½``.

    Args:
        model: the frozen initial policy π_0 (a ``PeftModel`` is evaluated with adapters disabled).
        tokenizer: the tokenizer the trainer will use.
        dataset: ``datasets.Dataset`` (or list of dicts) with ``prompt``, ``chosen``, ``rejected``.
        better_template, worse_template: contexts with a ``{prompt}`` placeholder. **[unknown → rec.]**: the
            paper's wording was not retrievable; the defaults ask for a helpful/correct/coherent/concise revision and
            its opposite (card treg.md §2.1). Record them in the run card.
        batch_size: sequences per forward. device: defaults to the model's device.
        store_token_ids: also store ``{side}_token_reward_ids`` so the trainer can verify the alignment.

    Returns:
        ``datasets.Dataset`` with added columns ``chosen_token_rewards`` / ``rejected_token_rewards`` (lists of
        floats in (−0.5, 0.5), one per completion token).

    Raises:
        ValueError: a template without ``{prompt}``.
    """
    from genalign.pipelines.language import reference_mode

    for t in (better_template, worse_template):
        if "{prompt}" not in t:
            raise ValueError("templates need a {prompt} placeholder")
    if not isinstance(dataset, Dataset):
        dataset = Dataset.from_list(list(dataset))
    device = device or next(model.parameters()).device
    rows = [dict(r) for r in dataset]
    items = []  # (row index, side, context ids better, context ids worse, completion ids)
    for i, ex in enumerate(rows):
        ids = tokenize_like_trl(tokenizer, ex)
        for side in ("chosen", "rejected"):
            ctx = []
            for tpl in (better_template, worse_template):
                c = _context_text(ex["prompt"], tpl, tokenizer)
                ctx.append(list(_tokenize(tokenizer, c, add_generation_prompt=True)["input_ids"]) if isinstance(c, list)
                           else list(_tokenize(tokenizer, c)["input_ids"]))
            items.append((i, side, ctx[0], ctx[1], ids[f"{side}_ids"]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results: dict[tuple[int, str], list[float]] = {}
    ids_out: dict[tuple[int, str], list[int]] = {}
    with reference_mode(model):
        for s in range(0, len(items), batch_size):
            chunk = items[s : s + batch_size]
            seqs, starts, comp = [], [], []
            for _, _, cb, cw, y in chunk:
                for ctx in (cb, cw):
                    seqs.append(ctx + y)
                    starts.append(len(ctx))
                    comp.append(len(y))
            width = max(map(len, seqs))
            input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            attn = torch.zeros_like(input_ids)
            for j, sq in enumerate(seqs):
                input_ids[j, : len(sq)] = torch.tensor(sq)
                attn[j, : len(sq)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attn.to(device), use_cache=False).logits
            logps = torch.log_softmax(logits.float()[:, :-1], -1).gather(-1, input_ids.to(device)[:, 1:, None])[..., 0]
            for k, (i, side, _, _, y) in enumerate(chunk):
                lb = logps[2 * k, starts[2 * k] - 1 : starts[2 * k] - 1 + comp[2 * k]]
                lw = logps[2 * k + 1, starts[2 * k + 1] - 1 : starts[2 * k + 1] - 1 + comp[2 * k + 1]]
                results[(i, side)] = token_rewards_from_contrastive_prompts(lb, lw).cpu().tolist()
                ids_out[(i, side)] = list(y)
    out = dataset
    for side in ("chosen", "rejected"):
        col = f"{side}_token_rewards"
        if col in out.column_names:
            out = out.remove_columns(col)
        out = out.add_column(col, [results[(i, side)] for i in range(len(rows))])
        if store_token_ids:
            idc = f"{side}_token_reward_ids"
            if idc in out.column_names:
                out = out.remove_columns(idc)
            out = out.add_column(idc, [ids_out[(i, side)] for i in range(len(rows))])
    return out


# --------------------------------------------------------------------------------------------------- synthetic data
def make_arithmetic_preference_rows(n: int, seed: int = 0, max_operand: int = 99, exclude: set | None = None,
                                    tagged: bool = False) -> list[dict]:
    """Synthetic preference pairs ``"a+b="`` → correct sum vs the sum with one digit changed.

    Args:
        n: number of rows. seed: RNG seed. max_operand: operands in [0, max_operand].
        exclude: ``(a, b)`` problems to skip (keep held-out problems out of training).
        tagged: also emit ``chosen_masked`` / ``rejected_masked`` with the differing digit in ``<MASK>…</MASK>``.

    Returns:
        list of ``{"prompt", "chosen", "rejected", "a", "b"}`` dicts (+ tagged columns).
    """
    rng = random.Random(seed)
    rows, seen = [], set(exclude or ())
    while len(rows) < n:
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        good = str(a + b)
        pos = rng.randrange(len(good))
        choices = [d for d in "0123456789" if d != good[pos] and not (pos == 0 and d == "0" and len(good) > 1)]
        bad = good[:pos] + rng.choice(choices) + good[pos + 1 :]
        row = {"prompt": f"{a}+{b}=", "chosen": good, "rejected": bad, "a": a, "b": b}
        if tagged:
            row["chosen_masked"] = good[:pos] + "<MASK>" + good[pos] + "</MASK>" + good[pos + 1 :]
            row["rejected_masked"] = bad[:pos] + "<MASK>" + bad[pos] + "</MASK>" + bad[pos + 1 :]
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------- end to end
TRAINERS = {"dpo": PreferenceTrainer, "rpo": PreferenceTrainer, "fdpo": PreferenceTrainer, "treg": TRegTrainer,
            "rrpo": RRPOTrainer}


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_lm_training(cfg: dict, output_dir: str) -> dict:
    """Run LM / video-LM preference training end to end from a plain config dict.

    Config blocks (see ``configs/rrpo_tiny.yaml``, ``configs/treg_tiny.yaml``):

    - ``objective``: :class:`ObjectiveArgs` fields (``name`` = loss type).
    - ``model``: :func:`genalign.pipelines.language.build_lm_from_config` keys, plus ``lora`` (``r``, ``alpha``,
      ``dropout``, ``target_modules``, ``bias``; ``null`` = full fine-tune with a frozen copy as reference).
    - ``data``: ``train`` / ``eval`` jsonl paths (``prompt``, ``chosen``, ``rejected`` [+ ``video``, tag columns,
      token rewards]) or ``synthetic: {kind: arithmetic, n_train, n_eval, seed}``; ``max_length``; for T-REG
      ``token_rewards: {better_template, worse_template, batch_size}`` (computed when the rows lack them); for
      video ``num_frames``, ``video_root``.
    - ``train``: ``trl.DPOConfig`` fields (``learning_rate``, ``max_steps``, ``per_device_train_batch_size``, …).

    Returns:
        summary dict: ``objective``, ``global_step``, ``train_loss``, ``first_loss``, ``last_loss``,
        ``log_history``, ``counts`` (dropped rows, segment statuses, unreadable videos), ``eval`` metrics,
        ``output_dir``.

    Raises:
        ValueError: malformed config; ModelUnavailableError: model not obtainable offline.
    """
    from genalign.pipelines.language import build_lm_from_config, lora_config

    objective = ObjectiveArgs.from_dict(cfg.get("objective") or {})
    mcfg = dict(cfg.get("model") or {})
    dcfg = dict(cfg.get("data") or {})
    tcfg = dict(cfg.get("train") or {})
    tcfg.setdefault("report_to", "none")
    tcfg.setdefault("save_strategy", "no")
    tcfg.setdefault("logging_steps", 1)
    tcfg.setdefault("gradient_checkpointing", False)
    tcfg.setdefault("max_length", dcfg.get("max_length", 1024))
    tcfg.setdefault("use_cpu", not torch.cuda.is_available())
    # TRL's DPOConfig defaults to bf16 autocast even on CPU; genalign: bf16 on GPU, fp32 on CPU (README §5)
    tcfg.setdefault("bf16", bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()))
    save_model = tcfg.pop("save_model", False)
    args = DPOConfig(output_dir=output_dir, **tcfg)

    bundle = build_lm_from_config(mcfg)
    model, proc = bundle.model, bundle.processing_class
    tok = bundle.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    if "synthetic" in dcfg:
        sc = dict(dcfg["synthetic"])
        if sc.get("kind", "arithmetic") != "arithmetic":
            raise ValueError(f"unknown synthetic data kind {sc.get('kind')!r}")
        ev = make_arithmetic_preference_rows(sc.get("n_eval", 16), seed=sc.get("seed", 0) + 1,
                                             tagged=objective.segments == "tags")
        train_rows = make_arithmetic_preference_rows(sc.get("n_train", 64), seed=sc.get("seed", 0),
                                                     exclude={(r["a"], r["b"]) for r in ev},
                                                     tagged=objective.segments == "tags")
        eval_rows = ev if sc.get("n_eval", 16) else None
    else:
        if "train" not in dcfg:
            raise ValueError("data config needs `train` (jsonl path) or `synthetic`")
        train_rows = _read_jsonl(dcfg["train"])
        eval_rows = _read_jsonl(dcfg["eval"]) if dcfg.get("eval") else None

    counts: Counter = Counter()
    collator = None
    if bundle.kind == "video":
        from genalign.data.video import VideoPreferenceCollator, filter_readable

        if objective.loss_type != "rrpo":
            raise ValueError("video-LM training is implemented for RRPO only")
        nf = dcfg.get("num_frames", 16)
        train_rows, bad = filter_readable(train_rows, nf, dcfg.get("video_root"))
        counts["train/unreadable_videos"] += bad
        if eval_rows:
            eval_rows, bad = filter_readable(eval_rows, nf, dcfg.get("video_root"))
            counts["eval/unreadable_videos"] += bad
        collator = VideoPreferenceCollator(proc, num_frames=nf, video_root=dcfg.get("video_root"),
                                           max_length=args.max_length, segment_mode=objective.segments,
                                           min_match=objective.min_match)
        args.remove_unused_columns = False

    train_ds = Dataset.from_list(train_rows)
    eval_ds = Dataset.from_list(eval_rows) if eval_rows else None
    if objective.loss_type == "treg" and "chosen_token_rewards" not in train_ds.column_names:
        trc = dict(dcfg.get("token_rewards") or {})
        train_ds = compute_token_rewards(model, tok, train_ds, **trc)
        if eval_ds is not None:
            eval_ds = compute_token_rewards(model, tok, eval_ds, **trc)

    lcfg = mcfg.get("lora", {"r": 8, "alpha": 16})
    peft_config, ref_model = None, None
    if lcfg:
        peft_config = lora_config(kind=bundle.kind, **lcfg)
    else:
        ref_model = copy.deepcopy(model).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)

    trainer_cls = TRAINERS[objective.loss_type]
    trainer = trainer_cls(model, ref_model=ref_model, args=args, objective=objective, data_collator=collator,
                          train_dataset=train_ds, eval_dataset=eval_ds, processing_class=proc,
                          peft_config=peft_config)
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {
        "objective": objective.loss_type,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "first_loss": losses[0] if losses else math.nan,
        "last_loss": losses[-1] if losses else math.nan,
        "log_history": trainer.state.log_history,
        "counts": dict(counts + trainer.genalign_counts + getattr(collator, "counts", Counter())),
        "output_dir": output_dir,
    }
    if eval_ds is not None:
        summary["eval"] = trainer.evaluate()
    if save_model:
        trainer.save_model(output_dir)
    return summary
