"""Atomic checkpoints on every rank, and finding the latest complete one.

Layout: ``RUN_DIR/checkpoints/step_000050/`` holding Accelerate's ``save_state`` files (optimizer, RNG states,
registered objects), ``trainable.safetensors`` (+ ``trainable_1.safetensors``... for extra trained modules; only the trained parameters: LoRA or the full UNet), ``training_state.pt`` (LR schedules, EMA, objective state; read with ``weights_only=True``),
``trainer_state.json``, ``config.yaml`` and a ``COMPLETE`` marker. It is written under ``.tmp-step_000050`` and
renamed when complete, so a killed run never leaves a checkpoint that ``--resume latest`` would pick up half-written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MARKER = "COMPLETE"


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (half-written ``.tmp-*`` folders and unmarked ones skipped)."""
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return []
    found = [p for p in ck.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / MARKER).exists()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def resolve_resume(run_dir: str | Path, resume: str | None) -> Path | None:
    """``None`` → None; ``"latest"`` → newest complete checkpoint or None; a path → that checkpoint.

    Raises:
        FileNotFoundError: an explicit path that is not a complete checkpoint.
    """
    if resume is None:
        return None
    if resume == "latest":
        cks = list_checkpoints(run_dir)
        return cks[-1] if cks else None
    p = Path(resume)
    if not (p / MARKER).exists():
        raise FileNotFoundError(f"--resume {resume!r}: not a complete genalign checkpoint (no {MARKER} marker)")
    return p


def trainable_file(i: int) -> str:
    """File name of the i-th trainable module's parameters in a checkpoint."""
    return "trainable.safetensors" if i == 0 else f"trainable_{i}.safetensors"


def save_trainable(module: torch.nn.Module, path: str | Path) -> None:
    """Save the parameters with ``requires_grad`` (by name) as safetensors."""
    state = {n: p.detach().contiguous().cpu() for n, p in module.named_parameters() if p.requires_grad}
    save_file(state, str(path))


def load_trainable(module: torch.nn.Module, path: str | Path) -> None:
    """Load parameters saved by :func:`save_trainable` into ``module`` in place.

    Raises:
        KeyError: the file's parameter names do not match the module's trainable parameters.
    """
    state = load_file(str(path))
    params = dict(module.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(state) != expected:
        missing, unexpected = expected - set(state), set(state) - expected
        raise KeyError(f"{path}: trainable parameters differ (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v.to(params[n].dtype))


def _fsync_tree(folder: Path) -> None:
    """Flush every file below ``folder`` and the folders themselves to disk (a power cut after the marker must
    not leave a COMPLETE checkpoint with truncated files)."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for d in [*sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True), folder]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def finalize_checkpoint(tmp_dir: Path, final_dir: Path, trainer_state: dict, config_yaml: str) -> None:
    """Write state + config, flush everything to disk, then the marker, and rename ``tmp_dir`` to ``final_dir``
    (main process only)."""
    (tmp_dir / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    (tmp_dir / "config.yaml").write_text(config_yaml)
    _fsync_tree(tmp_dir)
    (tmp_dir / MARKER).write_text("ok\n")
    _fsync_tree(tmp_dir)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    tmp_dir.rename(final_dir)
    fd = os.open(final_dir.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_checkpoint(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed (a truncated or unreadable file, named), or None if
    every file it needs reads: ``trainer_state.json`` parses and each ``*.safetensors`` header and data size agree."""
    from safetensors import safe_open

    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as err:
        return f"{path / 'trainer_state.json'}: {err}"
    for f in sorted(path.rglob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass  # parses the header; a truncated data section is caught by the size check below
            with open(f, "rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                meta = json.loads(fh.read(header_len))
            end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
            if f.stat().st_size < 8 + header_len + end:
                return f"{f}: truncated ({f.stat().st_size} bytes, header says {8 + header_len + end})"
        except Exception as err:  # noqa: BLE001 — any unreadable file makes the checkpoint unusable
            return f"{f}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    return None


def resume_candidates(run_dir: str | Path, resume: str | None) -> list[Path]:
    """Checkpoints to try for ``resume``, newest first: all complete ones for ``"latest"`` (a corrupt newest
    one falls back to the previous), the one named for an explicit path, none for None.

    Raises:
        FileNotFoundError: an explicit path that is not a complete checkpoint.
    """
    if resume is None:
        return []
    if resume == "latest":
        return list(reversed(list_checkpoints(run_dir)))
    return [resolve_resume(run_dir, resume)]


def prune_checkpoints(run_dir: str | Path, limit: int | None) -> None:
    """Keep only the ``limit`` newest complete checkpoints (and remove stale ``.tmp-*`` folders)."""
    ck = Path(run_dir) / "checkpoints"
    for stale in ck.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if limit is None:
        return
    for old in list_checkpoints(run_dir)[:-limit]:
        shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "latest") -> Path:
    """Re-export a run from one of its checkpoints (``genalign export RUN_DIR OUT_DIR``).

    Raises:
        FileNotFoundError: no complete checkpoint in ``RUN_DIR``.
    """
    from genalign.config import load_config
    from genalign.registry import pipelines
    from genalign.export import export_pipeline

    run_dir = Path(run_dir)
    ck = resolve_resume(run_dir, checkpoint)
    if ck is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint under checkpoints/ to export")
    cfg = load_config(ck / "config.yaml")
    model = pipelines.get(cfg.pipeline.name).from_config(cfg.pipeline)
    load_trainable(model.denoiser(), ck / "trainable.safetensors")
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
    return export_pipeline(model, cfg, out_dir, summary)
