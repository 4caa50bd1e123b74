"""Round bookkeeping shared by the objectives that train in rounds (DDO self-play, DRAGON on-policy rounds).

A round is a stretch of optimizer steps during which the objective's generated data is fixed: DDO's reference
samples (regenerated when the reference changes) or DRAGON's demonstrations (regenerated with the current
policy). This module holds what both need and nothing method-specific:

- :class:`RoundClock`: round index, the step the round started at, the completed-round history, resumable;
- :func:`load_or_build_round`: one round's generated data cached in the run folder, built once by rank 0, read by
  every rank, refused when it was produced by another model state (a *fingerprint*);
- :func:`fingerprint`: a SHA-256 of nested tensors / values (the reference's identity);
- :class:`BestCheckpoint`: the lowest-scoring checkpoint of a round (selection by a distance, lower is better);
- :func:`optimizer_steps_per_pass`: optimizer steps for one pass over N rows (accumulation and ranks counted).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

__all__ = ["fingerprint", "RoundClock", "load_or_build_round", "BestCheckpoint", "optimizer_steps_per_pass"]


def fingerprint(obj: Any) -> str:
    """SHA-256 hex digest of a nested structure of dicts (keys sorted), lists, tensors (fp32 bytes) and reprs.

    Two reference states give the same fingerprint iff their recorded tensors and values are equal."""
    h = hashlib.sha256()
    if isinstance(obj, dict):
        for k in sorted(obj):
            h.update(str(k).encode())
            h.update(fingerprint(obj[k]).encode())
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            h.update(fingerprint(v).encode())
    elif isinstance(obj, torch.Tensor):
        h.update(obj.detach().cpu().contiguous().float().numpy().tobytes())
    else:
        h.update(repr(obj).encode())
    return h.hexdigest()


def optimizer_steps_per_pass(num_rows: int, batch_size: int, num_processes: int = 1,
                             gradient_accumulation_steps: int = 1) -> int:
    """Optimizer steps that consume ``num_rows`` rows once: ceil(N / (batch · ranks · accumulation)), at least 1.

    One optimizer step consumes ``batch_size`` rows per micro-step on each of ``num_processes`` ranks for
    ``gradient_accumulation_steps`` micro-steps (issue 14 item 8: forgetting the accumulation made DRAGON's
    "one pass" rounds four passes long in ``dragon_stable_audio.yaml``).

    Raises:
        ValueError: a count below 1 (or negative rows).
    """
    if num_rows < 0 or min(batch_size, num_processes, gradient_accumulation_steps) < 1:
        raise ValueError(f"need num_rows >= 0 and batch_size, num_processes, gradient_accumulation_steps >= 1, got "
                         f"{num_rows}, {batch_size}, {num_processes}, {gradient_accumulation_steps}")
    return max(1, math.ceil(num_rows / (batch_size * num_processes * gradient_accumulation_steps)))


@dataclass
class RoundClock:
    """Which round the run is in and when it started (optimizer steps), plus the per-round history.

    Attributes:
        round: 0-based round index. start_step: optimizer step at which the round started.
        history: JSON-able records appended by the objective (one or more per round).
        finished: the last round has been closed (no further switches).
    """

    round: int = 0
    start_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False

    def steps_in_round(self, step: int) -> int:
        """Optimizer steps completed in the current round at global step ``step``."""
        return step - self.start_step

    def advance(self, step: int) -> None:
        """Start the next round at ``step``."""
        self.round += 1
        self.start_step = step

    def state_dict(self) -> dict[str, Any]:
        """Plain values for a checkpoint (history as a JSON string: ``weights_only`` loading)."""
        return {"round": self.round, "round_start_step": self.start_step, "history": json.dumps(self.history),
                "finished": self.finished}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (missing keys: a fresh clock)."""
        self.round = int(state.get("round", 0))
        self.start_step = int(state.get("round_start_step", 0))
        self.history = json.loads(state.get("history", "[]"))
        self.finished = bool(state.get("finished", False))


def load_or_build_round(path: Optional[Path], build: Callable[[], dict[str, Any]], want_fingerprint: Optional[str],
                        accelerator: Any = None, key: str = "fingerprint") -> dict[str, Any]:
    """One round's generated data: from ``path`` if it exists (resume), else built by rank 0 and saved atomically.

    Args:
        path: ``RUN_DIR/<method>/<name>.pt``, or None (no run folder: build in memory).
        build: returns a dict of tensors / plain values; it must contain ``key`` when ``want_fingerprint`` is given.
        want_fingerprint: the identity of the model state the data must come from (None: not checked).
        accelerator: an Accelerate ``Accelerator`` (rank 0 builds, every rank waits then loads), or None.
        key: the dict entry holding the fingerprint.

    Returns:
        The dict, loaded with ``torch.load(weights_only=True)``.

    Raises:
        RuntimeError: the cached file was produced by another model state (names the file; delete it to rebuild).
    """
    if path is None:
        data = build()
    else:
        if (accelerator is None or accelerator.is_main_process) and not path.exists():
            data = build()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(data, tmp)
            tmp.replace(path)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        data = torch.load(path, weights_only=True)
    if want_fingerprint is not None and data.get(key) != want_fingerprint:
        raise RuntimeError(f"{path}: cached round data was generated by a different model state (round "
                           f"{data.get('round')}); delete it to regenerate")
    return data


@dataclass
class BestCheckpoint:
    """The best (lowest score) candidate of the current round: ``{"score", "step", "snapshot"}`` or empty."""

    best: dict[str, Any] = field(default_factory=dict)

    def consider(self, step: int, score: float, snapshot: Callable[[], dict[str, torch.Tensor]]) -> bool:
        """Keep this candidate if its score is the lowest so far (``snapshot()`` is only taken then); returns
        whether it was kept."""
        if self.best and score >= self.best["score"]:
            return False
        self.best = {"score": float(score), "step": int(step), "snapshot": snapshot()}
        return True

    def reset(self) -> None:
        """Forget the round's candidates (a new round starts)."""
        self.best = {}
