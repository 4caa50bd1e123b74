"""Within-batch reward normalisation shared by the composite reward, DRAGON's demonstrations and R0.

Pure functions on ``(B,)`` reward tensors; each method picks its own ``eps`` (R0's card: 1e-6; the composite
reward: 1e-8) and whether the statistics carry a gradient.
"""

from __future__ import annotations

import torch


def zscore(scores: torch.Tensor, eps: float = 1e-8, detach_stats: bool = False) -> torch.Tensor:
    """Within-batch z-score ``(r − mean) / (std + eps)`` with the population std; ``(B,)`` → ``(B,)``.

    Args:
        scores: ``(B,)`` rewards (higher is better), any float dtype (kept).
        eps: added to the std (so a constant batch gives 0, not NaN).
        detach_stats: treat mean and std as constants, so ∂z_b/∂r_b = 1/(std + eps) with no cross-sample terms
            (R0's batch normalisation, [recon]).

    Returns:
        ``(B,)``; B = 1 gives 0.

    Raises:
        ValueError: ``eps`` < 0.
    """
    if eps < 0:
        raise ValueError("eps must be >= 0")
    if scores.numel() < 2:
        return scores * 0.0
    ref = scores.detach() if detach_stats else scores
    return (scores - ref.mean()) / (ref.std(unbiased=False) + eps)


def rank_normalize(scores: torch.Tensor) -> torch.Tensor:
    """Within-batch ranks mapped to [0, 1] (``rank/(B−1)``; ties get their average rank); B = 1 → 0.5. No grad."""
    s = scores.detach().flatten()
    b = s.numel()
    if b < 2:
        return torch.full_like(s, 0.5)
    # average rank of ties: (#less) + (#equal − 1)/2
    less = (s[None, :] < s[:, None]).sum(1).to(s.dtype)
    equal = (s[None, :] == s[:, None]).sum(1).to(s.dtype)
    return (less + (equal - 1) / 2) / (b - 1)
