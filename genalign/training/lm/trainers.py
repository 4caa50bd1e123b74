"""One TRL ``DPOTrainer`` subclass for every LM objective: it computes log-probs, the objective computes the loss.

Supported TRL versions: **1.16.x** (``>=1.16.0,<1.17``). :class:`PreferenceTrainer` overrides TRL's private
``DPOTrainer._compute_loss`` (the only loss hook in 1.16 — card treg.md §5), ``_prepare_dataset``,
``_set_signature_columns_if_needed`` and ``compute_ref_log_probs``, plus HF ``Trainer._save_checkpoint`` (atomic
genalign checkpoints). Private APIs change between minor releases, so the version is checked at import time (set
``GENALIGN_SKIP_TRL_VERSION_CHECK=1`` to bypass at your own risk).

Reused from TRL: dataset tokenisation, the ``[chosen; rejected]`` right-padded batch, the fused LM head returning
per-token log-probs without logits, the PEFT adapter-off reference, Accelerate preparation, logging. The loss comes
from the objective (:class:`genalign.objectives.lm_base.LMObjective.lm_loss`) through :class:`_Forward`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import torch
from packaging.version import Version

from genalign.objectives.lm_base import LMObjective, TokenForward, masked_sum
from genalign.pipelines.lm_head import add_hidden_state_forward, lm_head_params, token_stats_chunked
from genalign.training import checkpoint as ckpt

logger = logging.getLogger(__name__)

TRL_MIN, TRL_MAX = "1.16.0", "1.17.0"


def _check_trl_version() -> None:
    try:
        import trl
    except ImportError as err:  # pragma: no cover - exercised only without trl
        raise ImportError(f"genalign LM training needs TRL >={TRL_MIN},<{TRL_MAX}: "
                          f"pip install 'trl>={TRL_MIN},<{TRL_MAX}'") from err
    v = Version(trl.__version__)
    if not (Version(TRL_MIN) <= v < Version(TRL_MAX)) and not os.environ.get("GENALIGN_SKIP_TRL_VERSION_CHECK"):
        raise ImportError(
            f"genalign LM training supports TRL >={TRL_MIN},<{TRL_MAX} (it overrides the private "
            f"DPOTrainer._compute_loss), found trl=={trl.__version__}. Install a supported version with "
            f"pip install 'trl>={TRL_MIN},<{TRL_MAX}', or set GENALIGN_SKIP_TRL_VERSION_CHECK=1 to try anyway.")


_check_trl_version()

from accelerate.utils import is_peft_model  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402
from trl.trainer.utils import use_adapter  # noqa: E402

from genalign.training.lm.collator import TokenFieldCollator  # noqa: E402

__all__ = ["PreferenceTrainer", "TRL_MIN", "TRL_MAX"]

TRL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


def _mean(x: torch.Tensor) -> float:
    return x.float().mean().item() if x.numel() else 0.0


def _fsync(folder: Path) -> None:
    for path in [*sorted(folder.rglob("*"), reverse=True), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _Forward(TokenForward):
    """The trainer's lazy per-batch forward passes, handed to ``objective.lm_loss``."""

    def __init__(self, trainer: "PreferenceTrainer", model, inputs):
        self.t, self.model, self.inputs = trainer, model, inputs
        self.model_kwargs = {k: v for k, v in inputs.items() if k not in trainer.non_model_keys}
        self.model_kwargs["use_cache"] = False
        self.mask = inputs["completion_mask"][..., 1:].bool()
        self._cache = None

    def reference_forward(self, **kw):
        t = self.t
        with torch.no_grad(), disable_gradient_checkpointing(t.model, t.args.gradient_checkpointing_kwargs):
            with t.reference_context():
                ref = t.model if t.ref_model is None else t.ref_model
                return ref(**self.model_kwargs, **kw)

    def token_logps(self):
        if self._cache is not None:
            return self._cache
        labels = self.inputs["input_ids"].masked_fill(self.inputs["completion_mask"] == 0, -100)
        T = self.mask.size(1)
        ref = None
        if not self.t.precompute_ref_logps:  # reference first: its activations are gone before the policy graph
            ref = self.reference_forward(labels=labels, fused_lm_head=True).log_probs[:, -T:].float()
        logps = self.model(**self.model_kwargs, labels=labels, fused_lm_head=True).log_probs[:, -T:].float()
        sums = None if ref is not None else (self.inputs["ref_chosen_logps"], self.inputs["ref_rejected_logps"])
        self._cache = logps, ref, sums
        return self._cache

    def token_logps_and_kl(self, chunk_size: int):
        T = self.mask.size(1)
        # reference first, under no_grad: its activations are freed before the policy graph exists
        ref_hidden = self.reference_forward(return_last_hidden_state=True).last_hidden_state[:, -(T + 1):-1]
        hidden = self.model(**self.model_kwargs, return_last_hidden_state=True).last_hidden_state[:, -(T + 1):-1]
        w, b = lm_head_params(self.t.accelerator.unwrap_model(self.t.model))
        wr, br = (w, b) if self.t.ref_model is None else lm_head_params(
            self.t.accelerator.unwrap_model(self.t.ref_model))
        B = hidden.size(0) // 2
        return token_stats_chunked(hidden, ref_hidden, w, self.inputs["input_ids"][..., 1:], self.mask, B,
                                   chunk_size, b, wr, br)


class PreferenceTrainer(DPOTrainer):
    """TRL ``DPOTrainer`` whose loss is the genalign LM objective's (DPO, RPO, f-DPO, T-REG, RRPO, plug-ins).

    Args:
        model, ref_model, args, data_collator, train_dataset, eval_dataset, processing_class, callbacks,
            optimizers, peft_config: as ``trl.DPOTrainer`` (TRL 1.16).
        objective: an :class:`~genalign.objectives.lm_base.LMObjective` instance (its ``config.beta`` overrides
            ``args.beta`` so TRL logs the same β).
        run_dir: if set, checkpoints are written atomically as ``run_dir/checkpoints/step_NNNNNN`` (HF files +
            ``config.yaml`` + ``COMPLETE`` marker); ``config_yaml`` is the resolved run config stored in each.
        checkpoints_total_limit: keep only this many newest checkpoints.

    Raises:
        TypeError: ``objective`` is not an LM objective.
        ValueError: ``precompute_ref_log_probs`` with an objective that needs the reference online (RRPO); a
            per-token objective without ``processing_class``.

    Logged per step: ``rewards/chosen|rejected|accuracies|margins``, ``logps/chosen|rejected``, ``implicit_acc``,
    ``margin``, ``per_pair_loss`` and the objective's metrics. ``genalign_counts`` holds dropped rows / statuses.
    """

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, *, objective: LMObjective,
                 data_collator=None, train_dataset=None, eval_dataset=None, processing_class=None, callbacks=None,
                 optimizers=(None, None), peft_config=None, run_dir=None, config_yaml: str = "",
                 checkpoints_total_limit: int | None = None, **kwargs):
        if not isinstance(objective, LMObjective):
            raise TypeError(f"objective must be a language-model objective (LMObjective), got "
                            f"{type(objective).__name__}")
        self.objective = objective
        self.genalign_counts: Counter = Counter()
        self.run_dir, self.config_yaml, self.checkpoints_total_limit = run_dir, config_yaml, checkpoints_total_limit
        fields = objective.token_fields()
        self.non_model_keys = TRL_KEYS | set(fields)
        args = args or DPOConfig(output_dir=f"genalign-{getattr(objective, 'registry_name', 'lm')}")
        args.beta = objective.config.beta
        if objective.online_reference and args.precompute_ref_log_probs:
            raise ValueError(f"{type(objective).__name__} needs the reference distribution at every position; "
                             "precompute_ref_log_probs must be False (card rrpo.md §4)")
        is_video = isinstance(train_dataset, Dataset) and "video" in train_dataset.column_names
        if is_video:
            args.remove_unused_columns = False  # the video collator needs prompt/chosen/rejected/video
        if data_collator is None and fields:
            if processing_class is None:
                raise ValueError("pass processing_class (tokenizer) when training with per-token side information")
            tok = getattr(processing_class, "tokenizer", processing_class)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            data_collator = TokenFieldCollator(pad_token_id=tok.pad_token_id, max_length=args.max_length,
                                               truncation_mode=args.truncation_mode,
                                               pad_to_multiple_of=args.pad_to_multiple_of, token_fields=fields)
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         callbacks=callbacks, optimizers=optimizers, peft_config=peft_config, **kwargs)
        if objective.online_reference:  # hidden-state path for the chunked token statistics
            base = self.accelerator.unwrap_model(self.model)
            add_hidden_state_forward(base.get_base_model() if is_peft_model(base) else base)
            if self.ref_model is not None:
                add_hidden_state_forward(self.accelerator.unwrap_model(self.ref_model))

    # ------------------------------------------------------------------ data hooks
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for c in ["row_id", "video", *self.objective.extra_columns()]:
            if c not in self._signature_columns:
                self._signature_columns.append(c)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if isinstance(dataset, Dataset) and "video" in dataset.column_names:
            return dataset  # video rows are processed on the fly by the video collator
        if isinstance(dataset, Dataset) and "row_id" not in dataset.column_names:
            dataset = dataset.add_column("row_id", list(range(len(dataset))))
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if not isinstance(dataset, Dataset):
            return dataset
        n = len(dataset)
        dataset = dataset.filter(lambda ex: ex["chosen_ids"] != ex["rejected_ids"])
        if len(dataset) < n:
            self.genalign_counts[f"{dataset_name}/dropped_identical"] += n - len(dataset)
            logger.warning("dropped %d %s pairs with identical chosen/rejected", n - len(dataset), dataset_name)
        return self.objective.prepare_dataset(dataset, processing_class, dataset_name, self.genalign_counts)

    def compute_ref_log_probs(self, model, inputs):
        # TRL filters its own non-model keys; drop genalign's per-token side information too
        return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items()
                                                     if k not in self.objective.token_fields()})

    def reference_context(self):
        """Adapter-off (or ``ref`` adapter) context for PEFT models without a separate reference."""
        if is_peft_model(self.model) and self.ref_model is None:
            unwrapped = self.accelerator.unwrap_model(self.model)
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        fwd = _Forward(self, model, inputs)
        out = self.objective.lm_loss(fwd)
        loss = out.losses.mean()
        g = self.accelerator.gather_for_metrics
        cr, rr = g(out.chosen_rewards.detach()), g(out.rejected_rewards.detach())
        m = self._metrics[mode]
        for k, v in (("rewards/chosen", cr), ("rewards/rejected", rr), ("rewards/accuracies", (cr > rr).float()),
                     ("rewards/margins", cr - rr), ("implicit_acc", (cr > rr).float()), ("margin", cr - rr),
                     ("per_pair_loss", g(out.losses.detach()))):
            m[k].append(_mean(v))
        metrics = dict(out.metrics)
        if "logps/chosen" not in metrics and fwd._cache is not None:  # sequence log-probs, as TRL logs them
            pc, pr = fwd._cache[0].chunk(2)
            mc, mr = fwd.mask.chunk(2)
            metrics["logps/chosen"] = masked_sum(pc, mc).detach()
            metrics["logps/rejected"] = masked_sum(pr, mr).detach()
        for k, v in metrics.items():
            m[k].append(_mean(g(v.detach().float().reshape(-1))))
        if return_outputs:  # no logits are materialised on genalign's paths
            return loss, None
        return loss

    # ------------------------------------------------------------------ atomic checkpoints
    def _save_checkpoint(self, model, trial):
        if self.run_dir is None:
            return super()._save_checkpoint(model, trial)
        step = self.state.global_step
        super()._save_checkpoint(model, trial)  # HF files into <output_dir>/checkpoint-<step>
        if not self.args.should_save:
            return
        src = Path(self.args.output_dir) / f"checkpoint-{step}"
        (src / "config.yaml").write_text(self.config_yaml)
        _fsync(src)  # files, then the marker, then rename: a kill or power cut never leaves a marked half-copy
        (src / ckpt.MARKER).write_text("ok\n")
        _fsync(src)
        final = Path(self.run_dir) / "checkpoints" / ckpt.checkpoint_name(step)
        if final.exists():
            shutil.rmtree(final)
        src.rename(final)
        ckpt.prune_checkpoints(self.run_dir, self.checkpoints_total_limit)
