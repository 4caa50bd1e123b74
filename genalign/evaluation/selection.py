"""Checkpoint selection by Frechet distance of the policy's samples to the real training data.

DDO's rounds take "the best checkpoint θ*_n (over hyperparameters and iterations, by FID)" as the next
reference (ddo.md §2.4). FID needs an Inception network; genalign's stand-in ([recon]) is the Frechet distance in
a feature space that is available offline: pooled latents (any modality) or the digit classifier's penultimate
features (the digits demo). Every candidate is scored on the same prompts and seeds, so candidates differ only by
their weights.

Source: Heusel et al. 2017 (FID) for the distance; :func:`genalign.rewards.fad.frechet_distance` (float64).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

from genalign.pipelines.sampling import sample_latents
from genalign.rewards.fad import frechet_distance, gaussian_stats

__all__ = ["pool_features", "FrechetSelector"]


def pool_features(latents: torch.Tensor) -> torch.Tensor:
    """Latents → small feature vectors for a Frechet distance: ``(N, C, h, w)`` average-pooled to 4×4 and
    ``(N, C, T)`` to 4 frames (smaller inputs kept), flattened to ``(N, C·16)`` / ``(N, C·4)`` fp32."""
    x = latents.float()
    if x.ndim == 4 and x.shape[-1] > 4:
        x = F.adaptive_avg_pool2d(x, 4)
    elif x.ndim == 3 and x.shape[-1] > 4:
        x = F.adaptive_avg_pool1d(x, 4)
    return x.flatten(1)


class FrechetSelector:
    """Frechet distance (lower is better) of ``num_samples`` fixed-seed policy samples to real data.

    Args:
        prompts: the real rows' prompts; candidates sample prompts drawn once from them (seeded).
        real_latents: ``(N, ...)`` real training latents (feature space "latents").
        real_images: ``(N, 3, H, W)`` real images in [0, 1] (feature space "digits"), or None.
        features: "latents" (pooled latents, :func:`pool_features`) or "digits" (digit-classifier features).
        seed: fixes the prompts and the per-sample generators.
        num_samples, num_inference_steps, batch_size: sampler settings (guidance off).

    Raises:
        ValueError: ``features="digits"`` without ``real_images``.
    """

    def __init__(self, prompts: list[str], real_latents: torch.Tensor, real_images: Optional[torch.Tensor] = None,
                 features: Literal["latents", "digits"] = "latents", seed: int = 0, num_samples: int = 128,
                 num_inference_steps: int = 25, batch_size: int = 64):
        if features == "digits" and real_images is None:
            raise ValueError("selection_features: 'digits' needs the real images")
        g = torch.Generator().manual_seed(seed + 99991)
        rows = torch.randint(0, len(prompts), (num_samples,), generator=g)
        self.prompts = [prompts[i] for i in rows.tolist()]
        self.seeds = [seed * 104729 + i for i in range(num_samples)]
        self.features, self.steps, self.batch_size = features, num_inference_steps, batch_size
        self._clf = None
        if features == "digits":
            from genalign.rewards.digits import DigitClassifierReward

            self._clf = DigitClassifierReward()
            self.real_stats = gaussian_stats(self._clf.features(real_images).double())
        else:
            self.real_stats = gaussian_stats(pool_features(real_latents).double())

    @torch.no_grad()
    def score(self, model) -> float:
        """FD of the adapter's current policy samples to the real statistics (float64 → float)."""
        gens = [torch.Generator().manual_seed(s) for s in self.seeds]
        lat = sample_latents(model, self.prompts, gens, self.steps, 1.0, batch_size=self.batch_size)
        if self._clf is not None:
            feats = self._clf.features(model.decode(lat.to(model.device)).float().cpu())
        else:
            feats = pool_features(lat)
        mu, cov = gaussian_stats(feats.double())
        return float(frechet_distance(mu, cov, *self.real_stats))
