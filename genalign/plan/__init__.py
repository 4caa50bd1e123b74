"""``genalign plan``: a pre-flight for a run config — does it fit, how long a step takes, will the data load.

``models`` (architectures on the meta device) → ``trace`` (one traced step: activations, FLOPs) → ``checks`` (data,
sequence lengths, the printed table) → ``estimate`` (memory per GPU, step time, :func:`plan`, :func:`run_cli`) →
``preflight`` (the subset ``genalign train`` runs before loading weights).
"""

from genalign.plan.checks import print_plan, video_tokens
from genalign.plan.estimate import plan, plan_config, run_cli
from genalign.plan.models import (GIB, GPUS, MODEL_CONFIGS, Plan, PlanError, architecture, build_meta, count_params,
                                  shipped_config)

__all__ = ["GIB", "GPUS", "MODEL_CONFIGS", "Plan", "PlanError", "architecture", "build_meta", "count_params", "plan",
           "plan_config", "print_plan", "run_cli", "shipped_config", "video_tokens"]
