"""The checks ``genalign train`` runs before it loads a single weight (``train.preflight``, on by default).

They are ``genalign plan``'s, at the cost of seconds: the first data rows against the objective's schema (a data
file or folder that does not exist is an error here, not a warning), the (video-)LM sequence check (prompt +
expanded video tokens against ``max_length``), and — on a CUDA device, when the architecture resolves offline —
the parameter-side memory (weights, gradients, optimizer state, reference copy; no activation trace) against the
device's memory, for the launch's process count and sharding. The activation-free estimate is a lower bound of the
peak, so a refusal is never a false alarm of the estimate; ``genalign plan`` gives the whole picture.
"""

from __future__ import annotations

import math
import os

from genalign.plan.checks import check_data_rows, check_lm_data, sequence_checks
from genalign.plan.estimate import plan_config
from genalign.plan.models import GIB, Plan, PlanError, architecture

__all__ = ["PreflightError", "gpu_memory_gib", "launch_layout", "preflight"]


class PreflightError(PlanError):
    """The run would not start or not fit; the message lists every reason on one line."""


def gpu_memory_gib() -> float | None:
    """Total memory of this process's CUDA device in GiB; None without CUDA (then memory is not checked)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB


def launch_layout() -> tuple[int, str]:
    """``(processes, parallelism)`` of this launch from Accelerate's environment (``WORLD_SIZE``,
    ``ACCELERATE_USE_FSDP``, ``ACCELERATE_USE_DEEPSPEED``); a plain ``python`` run is ``(1, "ddp")``."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return world, "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return world, "zero2"
    return world, "ddp"


def preflight(cfg, label: str = "config") -> Plan:
    """Run the pre-load checks on a validated config (module docstring).

    Args:
        cfg: ``RunConfig`` / ``LMRunConfig``. label: the config's name in messages.

    Returns:
        the :class:`~genalign.plan.models.Plan` (its ``data`` / ``sequence`` / ``notes`` lines say what was checked).

    Raises:
        PreflightError: data that would not load, a video cut by ``max_length``, or parameters that do not fit
            the GPU — every reason, and how to skip the checks.
    """
    is_lm = getattr(cfg, "family", "diffusion") == "lm"
    try:  # a hub id that is not shipped may still be in the local cache: unresolved is "not checked", not an error
        spec = architecture(cfg.pipeline.model, online=False, lm_tiny=dict(getattr(cfg.pipeline, "tiny", {}) or {}))
    except PlanError:
        spec = None
    gib = gpu_memory_gib()
    if spec is not None and gib is not None:
        gpus, parallelism = launch_layout()
        p = plan_config(cfg, label, gpus=gpus, gpu_memory=gib, parallelism=parallelism, spec=spec, trace=False,
                        require_data=True)
        if p.problems and p.problems[0].startswith("estimated peak"):
            p.problems[0] = (f"weights, gradients and optimizer state alone need {p.peak / GIB:.1f} GiB per GPU > "
                             f"{gib:.1f} GiB on this GPU ({gpus} process(es), {parallelism})")
    else:
        p = Plan(config=label, model=cfg.pipeline.model, gpu_memory=math.inf, trace=False)
        p.notes.append("memory not checked (" + ("no CUDA device" if gib is None else "architecture not resolved offline")
                       + ")")
        if is_lm:
            check_lm_data(cfg, p, require=True)
            if spec is not None:
                sequence_checks(cfg, p, spec)
        else:
            check_data_rows(cfg, p, require=True)
    if p.problems:
        raise PreflightError(f"{label}: would not start: " + "; ".join(p.problems)
                             + " (details: `genalign plan`; skip these checks with --set train.preflight=false)")
    return p
