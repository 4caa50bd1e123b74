"""Progress and logs for every long phase of a run: bars on a terminal, timestamped lines elsewhere.

:class:`RunLog` is the run's log: each :meth:`RunLog.phase` shows a tqdm bar with count, rate and ETA when
standard error is a terminal, and otherwise one timestamped line at its start, every ``line_every`` updates and
at its end (CI logs, ``nohup``, notebooks' captured output); it records the phase's wall time for
``summary.json``'s ``phase_seconds``. :meth:`RunLog.metrics` appends one JSON object per logged step to
``logs/metrics.jsonl`` (time, step, metrics) beside the human log ``logs/train.log``.

Source: tqdm (bars), the standard ``logging`` module (timestamped lines).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger("genalign")


class Phase:
    """A running phase: call :meth:`update` with the work done (samples, steps); :meth:`postfix` sets the bar's
    trailing figures. Created by :meth:`RunLog.phase`."""

    def __init__(self, name: str, total: int | None, bar, line_every: int):
        self.name, self.total, self.bar, self.line_every = name, total, bar, line_every
        self.done = 0
        self._next_line = line_every
        self._t0 = time.time()

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` units."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.line_every and self.done >= self._next_line:
            self._next_line += self.line_every
            rate = self.done / max(time.time() - self._t0, 1e-9)
            eta = (self.total - self.done) / rate if self.total else float("nan")
            logger.info("%s: %d/%s (%.2f/s, ETA %.0f s)", self.name, self.done, self.total or "?", rate, eta)

    def postfix(self, **figures: Any) -> None:
        """Show ``figures`` after the bar (no-op without a bar)."""
        if self.bar is not None:
            self.bar.set_postfix(**figures)


class RunLog:
    """Progress, phase timings and the metrics log of one run (main process shows; other ranks stay quiet).

    Args:
        run_dir: the run folder (``logs/train.log``, ``logs/metrics.jsonl`` are written under it), or None.
        enabled: show progress at all (``progress=False`` in the API; always False on non-main ranks).
        line_every: with no terminal, log a line every this many units of a phase (0 = start/end only).
    """

    def __init__(self, run_dir: str | Path | None, enabled: bool = True, line_every: int = 50):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.line_every = line_every
        self.phase_seconds: dict[str, float] = {}
        self.metrics_file = Path(run_dir) / "logs" / "metrics.jsonl" if run_dir is not None else None

    def setup_file_logging(self, log_file: str | Path) -> None:
        """Send genalign's log records, timestamped, to ``log_file`` (and to stderr as lines when not a terminal)."""
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        handlers: list[logging.Handler] = [logging.FileHandler(log_file)]
        if self.enabled and not self.tty:
            handlers.append(logging.StreamHandler(sys.stderr))
        for h in handlers:
            h.setFormatter(fmt)
        logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)

    @contextlib.contextmanager
    def phase(self, name: str, total: int | None = None, unit: str = "it", initial: int = 0) -> Iterator[Phase]:
        """Time a phase and show its progress; its wall time (seconds, summed over repeats) goes into
        :attr:`phase_seconds` under ``name``."""
        from tqdm.auto import tqdm

        bar = None
        if self.enabled and self.tty:
            bar = tqdm(total=total, initial=initial, desc=name, unit=unit, dynamic_ncols=True)
        logger.info("%s: start%s", name, f" ({total} {unit})" if total else "")
        t0 = time.time()
        ph = Phase(name, total, bar, self.line_every if self.enabled else 0)
        ph.done = initial
        try:
            yield ph
        finally:
            if bar is not None:
                bar.close()
            dt = time.time() - t0
            self.phase_seconds[name] = round(self.phase_seconds.get(name, 0.0) + dt, 2)
            logger.info("%s: done in %.1f s", name, dt)

    def metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Append ``{"time", "step", **metrics}`` as one line of ``logs/metrics.jsonl``."""
        if self.metrics_file is None:
            return
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), "step": step, **metrics}) + "\n")


def print_summary_table(summary: dict, run_dir: Path) -> None:
    """The held-out reward table (base, trained, change), the wall time and every file the run wrote."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"held-out reward ({summary['heldout_prompts']}, {summary['samples_per_prompt']} samples/prompt)")
    for col, justify in (("reward", "left"), ("base", "right"), ("trained", "right"), ("change", "right")):
        table.add_column(col, justify=justify)
    before, after = summary["reward_before"], summary["reward_after"]
    for k in before:
        table.add_row(k, f"{before[k]:.4f}", f"{after[k]:.4f}", f"{after[k] - before[k]:+.4f}")
    console.print(table)
    console.print(f"{summary['steps']} steps in {summary['seconds']:.0f} s")
    written = [p for p in ("summary.json", "report.html", "export", "logs/metrics.jsonl", "samples")
               if (run_dir / p).exists()]
    console.print("wrote: " + ", ".join(str(run_dir / p) for p in written))


def log_validation_images(acc, trackers: list[str], folder: Path, step: int, max_images: int = 16) -> None:
    """Send a grid of the first ``max_images`` validation images kept in ``folder`` to the Accelerate trackers
    (TensorBoard ``add_image``, W&B ``wandb.Image``); audio runs and empty folders send nothing.

    Source: torchvision ``make_grid``; Accelerate ``get_tracker``.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.utils import make_grid

    files = sorted(Path(folder).glob("sample_*.png"))[:max_images]
    if not files:
        return
    grid = make_grid(torch.stack([decode_image(str(f), mode=ImageReadMode.RGB) for f in files]), nrow=8)
    if "tensorboard" in trackers:
        acc.get_tracker("tensorboard", unwrap=True).add_image("val/samples", grid, step)
    if "wandb" in trackers:
        import wandb

        acc.get_tracker("wandb", unwrap=True).log({"val/samples": wandb.Image(grid.permute(1, 2, 0).numpy())}, step=step)
