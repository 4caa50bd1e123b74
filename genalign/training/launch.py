"""Launch-time helpers of the diffusion trainer: CPU threads, the distributed type actually in effect, trackers.

Source: Accelerate (``Accelerator.distributed_type``), torch threading.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading

import torch

logger = logging.getLogger(__name__)


def resolve_num_threads(requested: int | None) -> int:
    """Torch CPU threads: ``train.num_threads``, else ``OMP_NUM_THREADS``, else the cores this process may use.

    On a shared machine torch's default (every physical core) oversubscribes when another process runs, and a
    step can swing from 0.1 s to 5 s; the affinity mask is what the scheduler actually grants this process.
    """
    if requested:
        return int(requested)
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_distributed_type(acc) -> None:
    """Log the distributed type in effect and refuse a launcher preset whose strategy did not take effect
    (e.g. an FSDP accelerate config on CPU, which Accelerate silently runs as plain multi-CPU data parallel).

    Raises:
        RuntimeError: ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED`` set but not in effect.
    """
    kind = str(acc.distributed_type).split(".")[-1]
    logger.info("distributed type %s, %d process(es)", kind, acc.num_processes)
    for env, want in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        if os.environ.get(env, "").lower() in ("1", "true") and kind != want:
            raise RuntimeError(f"the accelerate config asks for {want} but Accelerate runs {kind} here "
                               f"({acc.num_processes} process(es), device {acc.device}); {want} needs GPUs — use "
                               "configs/accelerate/cpu_2proc.yaml on CPU")


def tracker_available(name: str) -> bool:
    """Whether the ``train.trackers`` entry ``name`` (tensorboard | wandb) is installed; logs a warning if not."""
    mod = {"tensorboard": "tensorboard", "wandb": "wandb"}[name]
    if importlib.util.find_spec(mod) is None:
        logger.warning("train.trackers: %s is not installed; not logging to it", name)
        return False
    return True


def mean_over_ranks(acc, v: float) -> float:
    """The mean of a float over ranks (every rank takes part)."""
    if acc.num_processes == 1:
        return float(v)
    return float(acc.reduce(torch.tensor(float(v), device=acc.device), "mean").item())


def in_main_thread() -> bool:
    """Signal handlers can only be installed from the main thread."""
    return threading.current_thread() is threading.main_thread()


def flatten_config(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` with non-scalar leaves as strings (tracker hyperparameters)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def resolve_mixed_precision(setting: str) -> str:
    """The mixed precision a run uses: the config's value, or for ``auto`` the accelerate config's (``accelerate
    launch --config_file`` exports it as ``ACCELERATE_MIXED_PRECISION``), else bf16 on a bf16-capable GPU, else no.
    """
    if setting != "auto":
        return setting
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
    if launched in ("no", "fp16", "bf16"):
        return launched
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
