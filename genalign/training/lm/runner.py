"""An LM / video-LM preference run end to end, with the same run-folder contract as diffusion runs.

``RUN_DIR/config.yaml`` (resolved config) · ``logs/metrics.jsonl`` (TRL's log history) ·
``checkpoints/step_NNNNNN/`` (HF Trainer state: weights or adapter, optimizer, scheduler, RNG, ``trainer_state.json``;
plus ``config.yaml`` and a ``COMPLETE`` marker; written under a temporary name and renamed) · ``summary.json`` · ``report.html`` ·
``export/`` (merged model + ``adapter/``). ``resume="latest"`` continues from the newest complete checkpoint with the
HF Trainer's exact resume (data order, RNG, optimizer). The folder rules (refusal, lock, resume config check) are
:mod:`genalign.training.run_folder`'s, as for diffusion runs.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from pathlib import Path

import torch
import datasets
from datasets import Dataset
from transformers.trainer_callback import PrinterCallback
from trl import DPOConfig

from genalign.config import ConfigError, LMRunConfig, save_config
from genalign.data.video import VideoPreferenceCollator, filter_readable, read_preference_jsonl
from genalign.registry import objectives as OBJECTIVES
from genalign.training import checkpoint as ckpt
from genalign.training import run_folder
from genalign.training.lm.export import export_lm
from genalign.training.lm.report import write_lm_report
from genalign.training.lm.model import build_bundle, peft_and_reference
from genalign.training.lm.synthetic import make_arithmetic_preference_rows
from genalign.training.lm.trainers import PreferenceTrainer
from genalign.training.trainer import NonFiniteLossError
from genalign.data.jsonl import read_checked_jsonl, text_row_problem

logger = logging.getLogger(__name__)

__all__ = ["train_lm", "dpo_args", "load_rows"]

STAGING = ".tmp-trl"  # HF writes checkpoint-N here; renamed to step_NNNNNN when complete (stale ones pruned)


def dpo_args(cfg: LMRunConfig, run_dir: Path, progress: bool = True) -> DPOConfig:
    """``trl.DPOConfig`` from the typed ``train`` / ``data`` sections (``train.trl`` passes further fields).

    Raises:
        ConfigError: an unknown ``train.trl`` key (names it).
    """
    t = cfg.train
    known = set(DPOConfig.__dataclass_fields__)
    bad = sorted(set(t.trl) - known)
    if bad:
        raise ConfigError(f"train.trl.{bad[0]}: not a trl.DPOConfig field")
    gpu_bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    mp = t.mixed_precision
    kw = dict(
        output_dir=str(run_dir / "checkpoints" / STAGING), seed=cfg.seed, data_seed=cfg.seed,
        max_steps=t.steps if t.steps is not None else -1, num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        bf16=(mp == "bf16") or (mp == "auto" and gpu_bf16), fp16=(mp == "fp16"),
        gradient_checkpointing=t.gradient_checkpointing, logging_steps=t.log_every, report_to="none",
        save_strategy="steps", save_steps=t.checkpoint_every or 10**9, save_total_limit=None,
        use_cpu=not torch.cuda.is_available(), max_length=cfg.data.max_length, disable_tqdm=not progress,
    )
    if t.warmup_ratio:
        kw["warmup_steps"] = t.warmup_ratio  # transformers 5: a float < 1 is a ratio of the total steps
    kw.update(t.trl)
    return DPOConfig(**kw)


def _read_jsonl(path: str, counts: Counter) -> list[dict]:
    """Rows of a text preference jsonl; malformed rows are skipped and counted (``bad_rows/<reason>``)."""
    return read_checked_jsonl(path, text_row_problem, counts)


def load_rows(cfg: LMRunConfig, tagged: bool = False, counts: Counter | None = None
              ) -> tuple[list[dict], list[dict] | None]:
    """``(train_rows, eval_rows or None)`` from ``data.synthetic`` or ``data.train`` / ``data.eval``; malformed
    rows are skipped and counted in ``counts`` (``bad_rows/<reason>``)."""
    counts = counts if counts is not None else Counter()
    d = cfg.data
    if d.synthetic is not None:
        s = d.synthetic
        ev = make_arithmetic_preference_rows(s.n_eval, seed=s.seed + 1, tagged=tagged) if s.n_eval else []
        tr = make_arithmetic_preference_rows(s.n_train, seed=s.seed, exclude={(r["a"], r["b"]) for r in ev},
                                             tagged=tagged)
        return tr, ev or None
    read = (lambda p: read_preference_jsonl(p, counts)) if cfg.pipeline.name == "video_language" else \
        (lambda p: _read_jsonl(p, counts))
    return read(d.train), read(d.eval) if d.eval else None


def _pick_checkpoint(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume: the newest complete one that reads (a corrupt newest one is named and the previous
    one used, for ``latest``), an explicit path that reads, or None.

    Raises:
        FileNotFoundError: an explicit checkpoint that is incomplete or unreadable (names the file).
    """
    for i, cand in enumerate(ckpt.resume_candidates(run_dir, resume)):
        problem = ckpt.verify_checkpoint(cand)
        if problem is None:
            if i:
                logger.warning("resuming from the previous checkpoint %s instead", cand)
            return cand
        if resume != "latest":
            raise FileNotFoundError(f"--resume {resume}: checkpoint unreadable: {problem}")
        logger.warning("checkpoint %s is corrupt (%s)", cand, problem)
        print(f"warning: checkpoint {cand.name} is corrupt ({problem}); trying the previous one")
    return None


def train_lm(cfg: LMRunConfig, run_dir: str | Path, resume: str | None = None, progress: bool = True,
             overwrite: bool = False) -> dict:
    """Train an LM objective with TRL and write the run folder; returns the summary (also ``summary.json``).

    Args:
        cfg: a validated :class:`~genalign.config.LMRunConfig` (from :func:`genalign.config.load_config`).
        run_dir: run folder (created). resume: None, ``"latest"`` (newest complete checkpoint; fresh start if
            none) or a checkpoint folder.
        progress: show TRL's progress bar.
        overwrite: start over in a folder holding a previous run (only genalign's run files are removed).

    Returns:
        summary: ``objective``, ``steps``, ``train_loss``, ``first_loss``, ``last_loss``, ``log_history``,
        ``counts`` (dropped rows, segment statuses, unreadable videos), ``eval`` (if eval rows), ``seconds``,
        ``resumed_from``.

    Raises:
        ConfigError: unreadable data file, unknown ``train.trl`` key. ModelUnavailableError: model not obtainable.
        NonFiniteLossError: non-finite trained weights or final loss (nothing exported).
        FileNotFoundError: an explicit ``resume`` path that is not a complete checkpoint.
        RunFolderError: a non-empty folder without ``resume`` / ``overwrite``, a folder another run holds, or a
            resume whose config changes the run (:mod:`genalign.training.run_folder`, as for diffusion runs).
    """
    run_dir = Path(run_dir)
    run_folder.prepare_run_folder(run_dir, resume, overwrite)
    lock = run_folder.lock_run_folder(run_dir)
    try:
        return _train_locked(cfg, run_dir, resume, progress)
    finally:
        lock.release()


def _train_locked(cfg: LMRunConfig, run_dir: Path, resume: str | None, progress: bool) -> dict:
    t0 = time.time()
    resume_dir = _pick_checkpoint(run_dir, resume)
    if resume_dir is not None:
        run_folder.check_resume_config(resume_dir, cfg.model_dump(mode="json"))
    save_config(cfg, run_dir / "config.yaml")
    ckpt.prune_checkpoints(run_dir, None)  # stale .tmp-* staging folders of a killed run
    if not progress:  # no dataset map/filter bars either
        datasets.disable_progress_bars()
    obj_cls = OBJECTIVES.get(cfg.objective.name)
    objective = obj_cls(cfg.objective_params())
    torch.manual_seed(cfg.seed)
    bundle = build_bundle(cfg)
    model, proc, tok = bundle.model, bundle.processing_class, bundle.tokenizer
    opts = objective.collator_options()
    counts: Counter = Counter()
    train_rows, eval_rows = load_rows(cfg, tagged=opts.get("segment_mode") == "tags", counts=counts)
    args = dpo_args(cfg, run_dir, progress)
    collator = None
    if bundle.kind == "video":
        d = cfg.data
        train_rows, bad = filter_readable(train_rows, d.num_frames, d.video_root)
        counts["train/unreadable_videos"] += bad
        if eval_rows:
            eval_rows, bad = filter_readable(eval_rows, d.num_frames, d.video_root)
            counts["eval/unreadable_videos"] += bad
        collator = VideoPreferenceCollator(proc, num_frames=d.num_frames, video_root=d.video_root,
                                           max_length=d.max_length, frame_sampling=d.frame_sampling,
                                           chat_template=d.chat_template, **opts)
        args.remove_unused_columns = False
    if not train_rows:
        raise ConfigError(f"data.train: no usable rows ({dict(counts)})")
    train_ds = objective.prepare_rows(Dataset.from_list(train_rows), model, tok)
    eval_ds = objective.prepare_rows(Dataset.from_list(eval_rows), model, tok) if eval_rows else None
    peft_config, ref_model = peft_and_reference(cfg, model, bundle.kind)
    trainer = PreferenceTrainer(model, ref_model=ref_model, args=args, objective=objective, data_collator=collator,
                                train_dataset=train_ds, eval_dataset=eval_ds, processing_class=proc,
                                peft_config=peft_config, run_dir=run_dir, config_yaml=(run_dir / "config.yaml").read_text(),
                                checkpoints_total_limit=cfg.train.checkpoints_total_limit)
    if not progress:  # quiet: no per-step dicts on stdout (the history goes to logs/metrics.jsonl)
        trainer.remove_callback(PrinterCallback)
    result = trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    (run_dir / "logs").mkdir(exist_ok=True)
    (run_dir / "logs" / "metrics.jsonl").write_text(
        "".join(json.dumps(h, default=str) + "\n" for h in trainer.state.log_history))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    obj_counts = getattr(objective, "counts", Counter())
    summary = {
        "objective": cfg.objective.name,
        "pipeline": cfg.pipeline.name,
        "steps": trainer.state.global_step,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "first_loss": losses[0] if losses else result.training_loss,  # nothing logged: the run's mean loss
        "last_loss": losses[-1] if losses else result.training_loss,
        "log_history": trainer.state.log_history,
        "counts": dict(counts + trainer.genalign_counts + obj_counts + getattr(collator, "counts", Counter())),
        "resumed_from": str(resume_dir) if resume_dir else None,
        "output_dir": str(run_dir),
    }
    if eval_ds is not None:
        summary["eval"] = trainer.evaluate()
    bad = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad or not math.isfinite(summary["last_loss"]):
        what = f"trained tensor {bad[0]} holds NaN/inf" if bad else f"the last logged loss is {summary['last_loss']}"
        raise NonFiniteLossError(f"{run_dir}: {what} after step {summary['steps']} (learning_rate "
                                 f"{cfg.train.learning_rate}, max_grad_norm {cfg.train.max_grad_norm}); nothing "
                                 "exported, no summary written")
    summary["seconds"] = time.time() - t0
    if cfg.export.enabled:
        export_lm(trainer.model, proc, run_dir / "export", cfg, summary, merge_lora=cfg.export.merge_lora)
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(run_dir / "summary.json")
    if cfg.export.report:
        write_lm_report(run_dir)
    return summary
