"""Reward models: one registry, composable, differentiable where the method needs it.

``genalign.rewards.get(name, **kwargs)`` builds a registered reward; ``genalign list rewards`` shows them all.
"""

from __future__ import annotations

from genalign.rewards.base import Reward, WeightEntry, WeightsNotFoundError, load_state_dict, resolve_weight_file


def get(name: str, **kwargs) -> Reward:
    """Build the reward registered under ``name`` with constructor ``kwargs``.

    Raises:
        KeyError: unknown name (the message lists the registered rewards).
    """
    from genalign.registry import rewards

    return rewards.get(name)(**kwargs)


__all__ = ["Reward", "WeightEntry", "WeightsNotFoundError", "get", "load_state_dict", "resolve_weight_file"]
