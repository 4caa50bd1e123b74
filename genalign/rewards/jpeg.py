"""JPEG compressibility / incompressibility rewards (DDPO).

Definition (Black et al. 2023, "Training Diffusion Models with Reinforcement Learning", arXiv 2305.13301, §6.1;
kvablack/ddpo-pytorch ``ddpo_pytorch/rewards.py``): quantise to uint8 (``round(255·x)``, clamped), encode with
Pillow as JPEG at ``quality=95`` and measure the file size in kB (``bytes / 1000``).
Incompressibility is ``+kB`` (bigger files are better), compressibility ``−kB``.

Not differentiable (quantisation and entropy coding); :meth:`forward` raises if the input requires grad while
autograd is on, so a gradient objective (ReFL, DRaFT, AlignProp) fails loudly instead of training on zeros.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from genalign.registry import rewards as REWARDS
from genalign.rewards.base import Reward


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """JPEG file size of each image in kB (1 kB = 1000 bytes), as in DDPO.

    Args:
        images: ``(B, C, H, W)`` float in [0, 1], C = 1 (grey) or 3 (RGB). Values outside [0, 1] are clamped.
        quality: Pillow JPEG quality (DDPO uses 95).

    Returns:
        ``(B,)`` float32 sizes in kB. Byte counts depend on the Pillow/libjpeg build: compare, don't hard-code.

    Raises:
        ValueError: wrong shape or channel count.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 1|3, H, W), got shape {tuple(images.shape)}")
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for a in arr:
        img = Image.fromarray(np.ascontiguousarray(a[..., 0] if a.shape[-1] == 1 else a))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(np.asarray(sizes), dtype=torch.float32, device=images.device)


class _JpegBase(Reward):
    modality = "image"
    kind = "instance"
    differentiable = False
    input_format = "images (B, 1|3, H, W) float in [0, 1]"
    weights = None
    weight_free = True
    _sign = 1.0

    def __init__(
        self,
        quality: int = 95,
        per_megapixel: bool = False,
        device: str | torch.device | None = None,
        tiny: bool = False,
        weights: str | None = None,
    ):
        super().__init__()
        self.quality = int(quality)
        # [recon] kB per megapixel, so images of different resolutions can be mixed (rewards.md §9).
        self.per_megapixel = bool(per_megapixel)
        self.freeze()

    def forward(self, samples: torch.Tensor, prompts: list[str] | None = None, **conditions) -> torch.Tensor:
        if torch.is_grad_enabled() and samples.requires_grad:
            raise RuntimeError(
                f"reward {self.registry_name!r} is not differentiable (JPEG quantisation/entropy coding); use it "
                "with a policy-gradient objective or call .score() / wrap the call in torch.no_grad()"
            )
        kb = jpeg_size_kb(samples, self.quality)
        if self.per_megapixel:
            kb = kb / (samples.shape[-2] * samples.shape[-1] / 1e6)
        return self._sign * kb


@REWARDS.register("jpeg-incompressibility", "DDPO JPEG size in kB at quality 95 (+kB; non-differentiable)")
class JpegIncompressibility(_JpegBase):
    """DDPO JPEG incompressibility: ``+size_kB`` of the quality-95 JPEG (bigger file = higher reward).

    Args:
        quality: JPEG quality (DDPO: 95).
        per_megapixel: divide by H·W/1e6 (**[recon]**, for mixing resolutions; default off = DDPO).

    Shapes: ``(B, 1|3, H, W)`` in [0, 1] → ``(B,)`` float32 kB (uniform noise at 512² ≈ 300 kB, flat grey ≈ 5 kB).

    Raises:
        RuntimeError: the samples require grad while autograd is enabled (not differentiable).

    Source: DDPO (arXiv 2305.13301) and ddpo-pytorch ``rewards.py:jpeg_incompressibility``.
    """

    _sign = 1.0


@REWARDS.register("jpeg-compressibility", "DDPO JPEG compressibility: −kB at quality 95 (non-differentiable)")
class JpegCompressibility(_JpegBase):
    """DDPO JPEG compressibility: ``−size_kB`` of the quality-95 JPEG (smaller file = higher reward).

    Same arguments, shapes and errors as :class:`JpegIncompressibility`; equals its negation exactly.
    Flow-GRPO's variant is ``−kB/500``: apply that scale as a separate transform, not here.

    Source: DDPO (arXiv 2305.13301) and ddpo-pytorch ``rewards.py:jpeg_compressibility``.
    """

    _sign = -1.0
