"""Shared measurement code for the benchmarks: interleaved timing, peak-memory rise in fresh processes, tables.

Every benchmark in this folder imports it as ``from _harness import ...`` (a script's own folder is first on
``sys.path``, so ``python benchmarks/<name>.py`` finds it; tests put ``benchmarks/`` on the path the same way).

Why each piece exists (issue 16, "Benchmarks that can be trusted"):

- :func:`interleave`: contenders run in a freshly shuffled order in every round, and each round's ratio to the
  baseline is taken inside that round, so slow drift of a shared machine's load cancels in the ratio; the
  reported ratio is the median over rounds (with the min–max spread). CPU time is the process CPU time
  (``time.process_time``: all threads of this process, not other processes), wall time is ``perf_counter``.
- :func:`measure_rise` / :func:`memory_rounds`: peak memory is the rise of the kernel's resident-set high-water
  mark (``VmHWM`` in ``/proc/self/status``) above the resident set just before the measured step, in a fresh
  subprocess per contender and measurement, after one warm-up step (optimizer state and lazy initialisation
  already exist, so the rise is one steady-state step). The high-water mark is reset just before the step by
  writing ``5`` to ``/proc/self/clear_refs`` (Linux ≥ 4.0). glibc's mmap threshold is pinned to 128 KiB in the
  child (``MALLOC_MMAP_THRESHOLD_``) so large tensors are mapped and unmapped, and freed memory is not silently
  reused from the heap, which would hide part of the rise.
- :func:`markdown_table`: tables print as Markdown so they paste into ``benchmarks/README.md`` unchanged.

CPU-only and Linux-only for memory (``/proc``); on CUDA ``torch.cuda.max_memory_allocated`` would be the
measure instead (not implemented: no GPU here).
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

MALLOC_MMAP_THRESHOLD = 131072  # bytes; pinned so freed tensors go back to the OS (see module docstring)
MEMORY_METHOD = ("VmHWM rise above VmRSS before one step (fresh subprocess per measurement, 1 warm-up step, "
                 "HWM reset via /proc/self/clear_refs, glibc mmap threshold 128 KiB)")


# -- machine / threads -------------------------------------------------------------------------------------------
def set_threads(n: int) -> None:
    """Use ``n`` torch intra-op threads (and 1 inter-op thread) in this process.

    Raises:
        ValueError: ``n < 1``.
    """
    import torch

    if n < 1:
        raise ValueError(f"--threads must be ≥ 1, got {n}")
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (inter-op pool started): harmless
        pass


def load_average() -> tuple[float, float, float]:
    """1, 5 and 15-minute load averages of the machine (``os.getloadavg``)."""
    return os.getloadavg()


def machine_summary(threads: int) -> str:
    """One line naming the machine: CPU model, cores visible, load average now, torch version, threads used."""
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    la = load_average()
    return (f"machine: {cpu}, {cores} cores visible, load average {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f} (1/5/15 min), "
            f"torch {torch.__version__}, {threads} torch thread(s), python {platform.python_version()}")


# -- interleaved timing -----------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Per-round measurements of one contender (seconds per call) and its per-round ratios to the baseline."""

    cpu: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    cpu_ratio: list[float] = field(default_factory=list)
    wall_ratio: list[float] = field(default_factory=list)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    @property
    def wall_median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_ratio_median(self) -> float:
        return statistics.median(self.cpu_ratio)

    @property
    def wall_ratio_median(self) -> float:
        return statistics.median(self.wall_ratio)


def interleave(contenders: dict[str, Callable[[], Any]], baseline: str, rounds: int = 10, calls: int = 1,
               warmup: int = 1, seed: int = 0, sync: Callable[[], None] | None = None) -> dict[str, Timing]:
    """Time every contender in each of ``rounds`` rounds, in a new shuffled order per round.

    Args:
        contenders: name → a callable doing one unit of work (one training step, one pass over a data set).
        baseline: the contender the ratios are taken against (per round: contender time / baseline time).
        rounds: number of rounds (≥ 1; ≥ 10 for figures worth quoting).
        calls: calls per contender per round; the round's time is their mean (seconds per call).
        warmup: untimed calls per contender before the first round.
        seed: seed of the order shuffles (the order is printed-reproducible, not random per run).
        sync: called after each contender's calls (e.g. ``torch.cuda.synchronize``); None on CPU.

    Returns:
        name → :class:`Timing` with ``rounds`` entries per list (ratios of the baseline are all 1).

    Raises:
        ValueError: ``baseline`` is not a contender, or ``rounds`` / ``calls`` < 1.
    """
    if baseline not in contenders:
        raise ValueError(f"baseline {baseline!r} is not one of the contenders {list(contenders)}")
    if rounds < 1 or calls < 1:
        raise ValueError(f"rounds and calls must be ≥ 1, got rounds={rounds}, calls={calls}")
    rng = random.Random(seed)
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    if sync:
        sync()
    out = {name: Timing() for name in contenders}
    for _ in range(rounds):
        order = list(contenders)
        rng.shuffle(order)
        this_round: dict[str, tuple[float, float]] = {}
        for name in order:
            fn = contenders[name]
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(calls):
                fn()
            if sync:
                sync()
            this_round[name] = ((time.process_time() - c0) / calls, (time.perf_counter() - w0) / calls)
        bc, bw = this_round[baseline]
        for name, (c, w) in this_round.items():
            t = out[name]
            t.cpu.append(c)
            t.wall.append(w)
            t.cpu_ratio.append(c / bc if bc > 0 else float("nan"))
            t.wall_ratio.append(w / bw if bw > 0 else float("nan"))
    return out


def spread(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    """``"lo–hi"`` of a list (the range of per-round ratios printed next to their median)."""
    return f"{fmt.format(min(values))}–{fmt.format(max(values))}"


# -- peak memory ------------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.M)
    if not m:
        raise RuntimeError(f"/proc/self/status has no {key} line (Linux only)")
    return int(m.group(1))


def measure_rise(step: Callable[[], Any], warmup: int = 1) -> dict[str, float]:
    """Peak resident-memory rise (MiB) of one call of ``step`` above the resident set just before it.

    Runs ``warmup`` untimed calls first, then garbage-collects, returns freed heap to the OS (``malloc_trim``),
    resets the high-water mark (``/proc/self/clear_refs`` ← ``5``) and reads ``VmRSS``; after one call it reads
    ``VmHWM``. Meant to run in a fresh process (see :func:`child_main`).

    Returns:
        ``{"rise_mib": VmHWM − VmRSS_before, "baseline_mib": VmRSS_before}``.

    Raises:
        RuntimeError: not Linux, or the high-water mark cannot be reset (the rise would include set-up peaks).
    """
    import ctypes
    import gc

    for _ in range(warmup):
        step()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the pinned mmap threshold still returns large blocks
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as err:
        raise RuntimeError(f"cannot reset VmHWM through /proc/self/clear_refs ({err}); memory not measurable here") from None
    before = _status_kib("VmRSS")
    step()
    peak = _status_kib("VmHWM")
    return {"rise_mib": (peak - before) / 1024, "baseline_mib": before / 1024}


def child_env(threads: int) -> dict[str, str]:
    """Environment of a measurement subprocess: pinned glibc mmap threshold and ``threads`` OpenMP threads."""
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = str(MALLOC_MMAP_THRESHOLD)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_child(script: str, argv: list[str], threads: int, timeout: float = 1800) -> dict:
    """Run ``python script *argv`` in a fresh process and parse the JSON object on its last stdout line.

    Raises:
        RuntimeError: the child failed (its stderr tail is in the message) or printed no JSON.
    """
    proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, env=child_env(threads),
                          timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"benchmark child {script} {' '.join(argv)} failed (exit {proc.returncode}):\n{tail}")
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        raise RuntimeError(f"benchmark child {script} printed no JSON on its last line: {lines[-1][:200]!r}") from None


def memory_rounds(script: str, names: Sequence[str], repeats: int, argv: list[str], threads: int,
                  seed: int = 0, child_flag: str = "--child") -> dict[str, list[float]]:
    """Peak-memory rise of each contender, ``repeats`` times, one fresh subprocess per contender and repeat.

    The order of contenders is shuffled in each repeat (as :func:`interleave`). Each child is
    ``python script *argv child_flag NAME`` and must print ``json.dumps(measure_rise(...))`` last.

    Returns:
        name → list of ``rise_mib`` (one per repeat).
    """
    rng = random.Random(seed + 1)
    out: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        order = list(names)
        rng.shuffle(order)
        for name in order:
            out[name].append(run_child(script, [*argv, child_flag, name], threads)["rise_mib"])
    return out


def child_main(step: Callable[[], Any], warmup: int = 1) -> None:
    """In a measurement child: measure one step's rise and print it as JSON on the last stdout line."""
    print(json.dumps(measure_rise(step, warmup=warmup)), flush=True)


# -- output -----------------------------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    """A Markdown table, cells ``str()``-ed: the first ``left`` columns left-aligned, the others right-aligned.

    Raises:
        ValueError: a cell contains ``|`` (it would split the column).
    """
    cells = [[str(c) for c in r] for r in rows]
    bad = [c for c in [*headers, *(c for r in cells for c in r)] if "|" in str(c)]
    if bad:
        raise ValueError(f"table cell contains '|': {bad[0]!r}")
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(items):
        return "| " + " | ".join(it.ljust(w) if i < left else it.rjust(w) for i, (it, w) in enumerate(zip(items, widths))) + " |"

    sep = "|" + "|".join(("-" * (w + 2)) if i < left else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])
