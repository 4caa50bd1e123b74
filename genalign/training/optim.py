"""Optimizers and learning-rate schedules, through the libraries the official recipes use.

- ``adamw``: ``torch.optim.AdamW`` (MaPO, Diffusion-DPO LoRA READMEs);
- ``adamw_8bit``: ``bitsandbytes.optim.AdamW8bit`` (the SDXL LoRA recipes' ``--use_8bit_adam``);
- ``adafactor``: ``transformers.optimization.Adafactor`` with a fixed learning rate (the Diffusion-DPO paper's
  SDXL run: Adafactor, lr 2.048e-5, Wallace et al. 2024 §5).

Schedules come from ``diffusers.optimization.get_scheduler`` (constant, constant_with_warmup, linear, cosine,
cosine_with_restarts, polynomial), as in the diffusers training scripts.
"""

from __future__ import annotations

import torch

SCHEDULE_ALIASES = {"warmup": "constant_with_warmup"}


def make_optimizer(params, tcfg, learning_rate: float | None = None) -> torch.optim.Optimizer:
    """The optimizer named by ``tcfg.optimizer`` (or ``tcfg.use_8bit_adam``) over ``params``.

    Args:
        params: the parameters of one phase.
        tcfg: the run's :class:`genalign.config.TrainConfig` (betas, weight decay, epsilon).
        learning_rate: overrides ``tcfg.learning_rate`` (phases with their own rate, e.g. DI*'s fake score).

    Raises:
        ImportError: ``adamw_8bit`` without bitsandbytes (``pip install genalign[gpu]``).
    """
    lr = learning_rate or tcfg.learning_rate
    name = "adamw_8bit" if tcfg.use_8bit_adam else tcfg.optimizer
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate (relative_step off), as the paper's run; no update clipping beyond Adafactor's own.
        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=tcfg.weight_decay)
    if name == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("train.optimizer: adamw_8bit needs bitsandbytes (pip install genalign[gpu])") from None
        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(params, lr=lr, betas=(tcfg.adam_beta1, tcfg.adam_beta2), weight_decay=tcfg.weight_decay,
               eps=tcfg.adam_epsilon)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, tcfg) -> torch.optim.lr_scheduler.LambdaLR:
    """``diffusers.optimization.get_scheduler(tcfg.lr_scheduler)`` stepping once per optimizer step.

    ``warmup`` is an alias of ``constant_with_warmup`` (older genalign configs); warmup and total steps count
    optimizer steps (not micro-steps), as genalign steps the schedule once per optimizer step.
    """
    from diffusers.optimization import get_scheduler

    name = SCHEDULE_ALIASES.get(tcfg.lr_scheduler, tcfg.lr_scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=tcfg.warmup_steps, num_training_steps=max(1, tcfg.steps))
