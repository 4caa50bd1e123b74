"""Export an aligned pipeline that loads in vanilla Diffusers.

``OUT_DIR/`` holds a complete Diffusers pipeline folder (LoRA merged) loadable by
``diffusers.DiffusionPipeline.from_pretrained(OUT_DIR)``, the LoRA alone as
``OUT_DIR/pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(OUT_DIR)`` on the base model), and a
``README.md`` model card (base model, objective, hyperparameters, data, reward before/after). Everything is written
to ``OUT_DIR.tmp-*`` and renamed into place, so a failed export leaves nothing half-written.

Merging goes through the vanilla path on purpose (a fresh base pipeline, ``load_lora_weights`` of the exported
file, ``fuse_lora``, ``unload_lora_weights``), so the exported LoRA file is proven loadable by Diffusers itself.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import yaml

from genalign.model_card import model_card, push_to_hub  # noqa: F401  (README.md; push_to_hub re-exported)

EXPORT_MARKER = "genalign_export.json"  # marks a folder genalign wrote, so only such a folder is ever replaced


class ExportRefusedError(FileExistsError):
    """The export destination holds something genalign did not write (a run folder, a user's files)."""


def _check_destination(out_dir: Path) -> None:
    """Refuse to replace anything but a previous genalign export (or an empty folder)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportRefusedError(f"{out_dir}: exists and is not a folder; choose another export destination")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / EXPORT_MARKER).exists():
        raise ExportRefusedError(f"{out_dir}: holds files genalign did not export (no {EXPORT_MARKER}); refusing to "
                                 "replace it — choose an empty or new folder")


def recover_export_swap(out_dir: str | Path) -> None:
    """Finish or undo an export swap a kill interrupted, and remove stale temporary exports.

    A kill between ``OUT → OUT.old`` and ``OUT.tmp-* → OUT`` leaves no ``OUT``: the previous export comes back
    from ``OUT.old``. A leftover ``OUT.old`` beside a complete ``OUT`` is removed. ``OUT.tmp-*`` folders that
    genalign created (they carry the marker from their first moment) are removed; nothing else is touched.
    """
    out_dir = Path(out_dir)
    old = out_dir.with_name(out_dir.name + ".old")
    if old.is_dir() and (old / EXPORT_MARKER).exists():
        if not out_dir.exists():
            old.rename(out_dir)
        elif (out_dir / EXPORT_MARKER).exists():
            shutil.rmtree(old)
    if out_dir.parent.is_dir():
        for tmp in out_dir.parent.glob(out_dir.name + ".tmp-*"):
            if tmp.is_dir() and (tmp / EXPORT_MARKER).exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _publish_permissions(folder: Path) -> None:
    """Give an export the permissions of ordinary files under the user's umask (mkdtemp makes 0700 folders and
    some writers 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def export_pipeline(model, cfg, out_dir: str | Path, summary: dict | None = None) -> Path:
    """Write the export folder for a trained adapter (see module docstring).

    Args:
        model: the trained :class:`~genalign.pipelines.base.DiffusionAdapter`.
        cfg: the run's :class:`~genalign.config.RunConfig` (for the base model id and the model card).
        out_dir: destination: a new or empty folder, or a previous genalign export (replaced atomically).
        summary: optional training summary (reward before/after) for the model card.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ExportRefusedError: ``out_dir`` holds anything genalign did not export (a run folder, a user's files).
        ValueError: the model's trained weights are not finite (never exported).
        OSError: disk full / permission errors; the temporary folder is removed and ``out_dir`` is untouched.
    """
    out_dir = Path(out_dir)
    recover_export_swap(out_dir)
    _check_destination(out_dir)
    bad = [n for n, p in model.denoiser().named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ValueError(f"export: {len(bad)} trained tensors hold NaN/inf (first: {bad[0]}); nothing exported")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    marker = json.dumps({"objective": cfg.objective.name, "base_model": cfg.pipeline.model,
                         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1)
    try:
        (tmp / EXPORT_MARKER).write_text(marker)  # first: a stale temp folder is recognisably ours
        model.write_export(tmp, cfg)  # the adapter knows its layout (SD/SDXL, ControlNet, few-step, audio)
        card = model_card(cfg, summary) + model.model_card_extra(cfg)
        (tmp / "README.md").write_text(card)
        (tmp / "genalign_config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        _publish_permissions(tmp)
        if out_dir.exists():
            old = out_dir.with_name(out_dir.name + ".old")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
