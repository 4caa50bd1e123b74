"""Weight-free "style" rewards for the digits demo: ink mass and contrast.

Both are simple image statistics, differentiable, and need no weights, so they make convenient targets for
end-to-end tests of reward-maximising objectives (a generator trained on them must visibly change: bolder digits
or harsher contrast).

Source: genalign's own (digits demo); no paper.
"""

from __future__ import annotations

import torch

from genalign.registry import rewards as REWARDS
from genalign.rewards.base import Reward


def _check_images(samples: torch.Tensor) -> torch.Tensor:
    if samples.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(samples.shape)}")
    return samples


@REWARDS.register("ink_mass", "mean pixel intensity (digits demo; weight-free, differentiable)")
class InkMass(Reward):
    """Ink mass: the mean pixel intensity of each image.

    ``r_i = mean_{c,h,w} x_i``. With white digits on black (MNIST-like data) this is the fraction of ink.

    Shapes: samples ``(B, C, H, W)`` float in [0, 1] (any C) → ``(B,)`` float32 in [0, 1].
    Differentiable: yes (the gradient is uniform, ``1/(C·H·W)`` per pixel).

    Raises:
        ValueError: samples are not 4-D.
    """

    modality = "image"
    kind = "instance"
    differentiable = True
    input_format = "images (B, C, H, W) float in [0, 1], any number of channels"
    weights = None
    weight_free = True

    def __init__(self, device: str | torch.device | None = None, tiny: bool = False, weights: str | None = None):
        super().__init__()
        self.freeze()

    def forward(self, samples: torch.Tensor, prompts: list[str] | None = None, **conditions) -> torch.Tensor:
        x = _check_images(samples)
        return x.flatten(1).float().mean(dim=1)


@REWARDS.register("contrast", "pixel standard deviation per image (digits demo; weight-free, differentiable)")
class Contrast(Reward):
    """Contrast: the population standard deviation of each image's pixels.

    ``r_i = sqrt(mean_{c,h,w} (x_i − mean x_i)² + eps)`` with ``eps = 1e-12`` (so the gradient of a flat image is
    finite, not NaN). Population (``unbiased=False``) std: a binary image with ink fraction p scores
    ``sqrt(p(1−p))``.

    Shapes: samples ``(B, C, H, W)`` float in [0, 1] → ``(B,)`` float32 in [0, 0.5].
    Differentiable: yes.

    Raises:
        ValueError: samples are not 4-D.
    """

    modality = "image"
    kind = "instance"
    differentiable = True
    input_format = "images (B, C, H, W) float in [0, 1], any number of channels"
    weights = None
    weight_free = True

    def __init__(self, device: str | torch.device | None = None, eps: float = 1e-12, tiny: bool = False,
                 weights: str | None = None):
        super().__init__()
        self.eps = float(eps)
        self.freeze()

    def forward(self, samples: torch.Tensor, prompts: list[str] | None = None, **conditions) -> torch.Tensor:
        x = _check_images(samples).flatten(1).float()
        var = (x - x.mean(dim=1, keepdim=True)).pow(2).mean(dim=1)
        return (var + self.eps).sqrt()
