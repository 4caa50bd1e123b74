"""The run folder contract: one run per folder, an exclusive lock, exact resume only of the same run.

- A folder holding anything (a previous run, a user's files) is refused unless the call resumes it
  (``--resume``) or asks to start over (``--overwrite``, which removes only what genalign writes in a run folder:
  :data:`RUN_ENTRIES`; a folder holding anything else is refused even then).
- An exclusive ``filelock`` on ``RUN_DIR/.genalign.lock`` for the whole run: a second run writing the same folder
  stops at once with one line.
- Resuming compares the new config with the checkpoint's: keys that change the run's meaning or break exact
  resume (seed, model, objective, LoRA rank, learning rate, batch size ...) are refused, naming each key; the
  keys in :data:`RESUMABLE_KEYS` (more steps, logging, validation, export) may change.
- Cached intermediate results (the base model's held-out reward, on-policy pairs) are keyed by a fingerprint
  of the config parts that produced them (:func:`fingerprint`), so a cache from another run is never reused.

Source: genalign's own; the lock is ``filelock`` (the library huggingface_hub uses for its cache).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from genalign.config import ConfigError

LOCK_FILE = ".genalign.lock"
RUN_ENTRIES = {"config.yaml", "checkpoints", "export", "export.old", "logs", "samples", "summary.json",
               "reward_before.json", "report.html", "data", "rounds", "ddo", "dragon", LOCK_FILE}
RESUMABLE_KEYS = ("train.steps", "train.checkpoint_every", "train.checkpoints_total_limit", "train.log_every",
                  "train.trackers", "train.num_threads", "train.ddp_timeout_s", "train.on_nan", "validation.",
                  "export.", "data.num_workers")


class RunFolderError(ConfigError):
    """The run folder cannot be used as asked (one line naming the folder and the way out)."""


def prepare_run_folder(run_dir: Path, resume: str | None, overwrite: bool, main_process: bool = True) -> None:
    """Check (and with ``overwrite``, clear) ``run_dir`` before anything is written.

    Raises:
        RunFolderError: ``run_dir`` is a file; or holds a run / other files without ``resume`` / ``overwrite``;
            or ``overwrite`` is asked for a folder holding files genalign did not write.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: output folder is a file; choose another --output-dir")
    # The lock file alone does not make a folder non-empty (another rank of this run may have just taken it).
    entries = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE) if run_dir.is_dir() else []
    if not entries or resume is not None:
        return
    foreign = [e for e in entries if e not in RUN_ENTRIES and not e.startswith("export.tmp-")]
    if not overwrite:
        what = "a previous run" if "config.yaml" in entries else f"{len(entries)} entries"
        raise RunFolderError(f"{run_dir}: holds {what}; continue it with --resume latest, start over with --overwrite, "
                             "or choose another --output-dir")
    if foreign:
        raise RunFolderError(f"{run_dir}: --overwrite removes only genalign's run files, but the folder also holds "
                             f"{foreign[:5]}; choose another --output-dir")
    if main_process:
        for e in entries:
            path = run_dir / e
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def lock_run_folder(run_dir: Path):
    """Take the run folder's exclusive lock (released when the returned lock is released or the process ends).

    Raises:
        RunFolderError: another process holds it.
    """
    from filelock import FileLock, Timeout

    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunFolderError(f"{run_dir}: another genalign run is writing this folder (lock {LOCK_FILE} held); "
                             "wait for it or choose another --output-dir") from None
    return lock


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_changes(saved: dict, current: dict) -> list[str]:
    """Keys whose values differ between two resolved configs and may not change on resume, as ``key (a → b)``."""
    a, b = _flatten(saved), _flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key) or any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS):
            continue
        out.append(f"{key} ({a.get(key, '<unset>')!r} → {b.get(key, '<unset>')!r})")
    return out


def check_resume_config(checkpoint: Path, current: dict) -> None:
    """Refuse a resume whose config changes the run (see the module docstring).

    Raises:
        RunFolderError: the changed keys, named.
    """
    saved_file = checkpoint / "config.yaml"
    if not saved_file.exists():
        return
    changes = config_changes(yaml.safe_load(saved_file.read_text()) or {}, current)
    if changes:
        raise RunFolderError(f"--resume {checkpoint}: the config differs from the checkpoint's in {'; '.join(changes[:6])}"
                             f"{' (+%d more)' % (len(changes) - 6) if len(changes) > 6 else ''}; these change the run "
                             "or break exact resume — start a new run folder (allowed changes: "
                             f"{', '.join(k.rstrip('.') for k in RESUMABLE_KEYS)})")


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable config parts (what produced a cached result)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
