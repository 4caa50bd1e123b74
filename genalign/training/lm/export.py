"""LM export: ``OUT/`` = merged weights + processor (``AutoModel*.from_pretrained(OUT)``), ``OUT/adapter/`` = the
LoRA adapter (``PeftModel.from_pretrained(base, OUT/adapter)``), ``OUT/README.md``; written atomically."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from genalign.config import load_config
from genalign.export import EXPORT_MARKER, ExportRefusedError, recover_export_swap
from genalign.training import checkpoint as ckpt
from genalign.training.lm.model import build_bundle

__all__ = ["export_lm", "export_lm_run", "load_lm_for_run"]



def _swap_in(tmp: Path, out: Path) -> None:
    """``OUT → OUT.old``, ``OUT.tmp-* → OUT``, drop ``OUT.old`` (a kill in between is repaired by
    :func:`genalign.export.recover_export_swap`)."""
    old = out.with_name(out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


def export_lm(model, processing_class, out_dir: str | Path, cfg=None, summary: dict | None = None,
              merge_lora: bool = True) -> Path:
    """Write an LM export folder atomically (``OUT.tmp-*`` then rename; only a previous export is replaced).

    Args:
        model: the trained model (``PeftModel`` or plain ``PreTrainedModel``); a ``PeftModel`` is merged in place
            when ``merge_lora`` (call last). processing_class: tokenizer / processor saved beside the weights.
        out_dir: destination. cfg: the run config (model card). summary: the run summary (model card figures).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ValueError: non-finite weights (nothing is written).
        ExportRefusedError: ``out_dir`` holds files genalign did not export (never replaced).

    Library: transformers ``save_pretrained``, peft ``merge_and_unload``.
    """
    out = Path(out_dir)
    for n, p in model.named_parameters():
        if p.requires_grad and not torch.isfinite(p).all():
            raise ValueError(f"export: trained tensor {n} holds NaN/inf; nothing exported")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / EXPORT_MARKER).exists())):
        raise ExportRefusedError(f"{out}: holds files genalign did not export (no {EXPORT_MARKER}); refusing to "
                                 "replace it — choose an empty or new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_export_swap(out)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    (tmp / EXPORT_MARKER).write_text(json.dumps({"family": "lm"}) + "\n")  # first: a stale temp is recognisably ours
    try:
        _write(model, processing_class, tmp, cfg, summary, merge_lora)
        _swap_in(tmp, out)
    except BaseException:  # disk full, kill, bad weights: the destination stays as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write(model, processing_class, tmp: Path, cfg, summary, merge_lora: bool) -> None:
    is_peft = hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")
    if is_peft:
        model.save_pretrained(tmp / "adapter")
        if merge_lora:
            model = model.merge_and_unload()
    if not is_peft or merge_lora:
        model.save_pretrained(tmp)
        processing_class.save_pretrained(tmp)
    lines = ["# genalign language-model export", ""]
    if cfg is not None:
        lora = cfg.pipeline.lora.model_dump() if cfg.pipeline.lora else "none (full fine-tune)"
        lines += [f"- objective: `{cfg.objective.name}` ({json.dumps(cfg.objective.model_dump())})",
                  f"- base model: `{cfg.pipeline.model}`", f"- LoRA: {lora}"]
    if summary:
        lines += [f"- steps: {summary.get('steps')}, last loss: {summary.get('last_loss')}"]
    lines += ["", "Load: `AutoModelForCausalLM.from_pretrained(this_folder)` (video-LMs: "
              "`AutoModelForImageTextToText`); the adapter alone: `PeftModel.from_pretrained(base, 'adapter')`."]
    (tmp / "README.md").write_text("\n".join(lines) + "\n")


def load_lm_for_run(cfg, checkpoint_dir: str | Path | None = None):
    """Rebuild the run's model (and processor) and load a checkpoint's trained weights (adapter or full model).

    Returns:
        ``(model, processing_class)``.
    """
    bundle = build_bundle(cfg)
    model = bundle.model
    if checkpoint_dir is not None:
        ck = Path(checkpoint_dir)
        if (ck / "adapter_config.json").exists():
            model = PeftModel.from_pretrained(model, str(ck))
        else:
            cls = AutoModelForImageTextToText if cfg.pipeline.name == "video_language" else AutoModelForCausalLM
            model = cls.from_pretrained(str(ck))
    return model, bundle.processing_class


def export_lm_run(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "latest") -> Path:
    """``genalign export`` for an LM run: the newest (or a given) checkpoint → :func:`export_lm`.

    Raises:
        FileNotFoundError: the run has no complete checkpoint.
    """
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    ck = ckpt.resolve_resume(run_dir, checkpoint)
    if ck is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint to export")
    model, proc = load_lm_for_run(cfg, ck)
    return export_lm(model, proc, out_dir, cfg, merge_lora=cfg.export.merge_lora)
