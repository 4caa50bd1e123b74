"""Condition-consistency rewards: a perception model predicts the condition back from a generated image.

Used by ControlNet++ / Ctrl-U (ctrl_u.md §2.1 step 4–5) as *reward models* and by the evaluation helpers
(:mod:`genalign.evaluation.condition`). Every member is a :class:`ConditionReward` with one ``task``; the
transformers segmenters (and the ADE20K palette) live in :mod:`genalign.rewards.segmentation`:

============== ====================== ======================================= =================================
name           task                   model                                   differentiable
============== ====================== ======================================= =================================
upernet        segmentation           transformers ``UperNetForSemanticSegmentation`` yes
segformer      segmentation           transformers ``SegformerForSemanticSegmentation`` yes
mask2former    segmentation           transformers ``Mask2FormerForUniversalSegmentation`` yes (log of semantic probs)
dpt_depth      depth                  transformers ``DPTForDepthEstimation`` (dpt-hybrid-midas)  yes
soft_edges     lineart                torch Sobel magnitude, ``1 − exp(−|∇|/scale)``  yes
canny          hed                    ``kornia.filters.canny`` (binary edges)  no (like HED in the official code)
digit_stroke_mask segmentation (2 cls) soft threshold of the grey level (digits demo)  yes
============== ====================== ======================================= =================================

Interface (beyond :class:`~genalign.rewards.base.Reward`):

- :meth:`ConditionReward.predict` ``(images) -> pred`` with autograd: segmentation logits ``(B, K, h, w)``; depth
  ``(B, h, w)`` (raw); edges ``(B, 1, h, w)`` in [0, 1];
- :meth:`ConditionReward.target_from_condition` ``(condition, images=None) -> target``: segmentation labels
  ``(B, H, W)`` int64 (255 = ignore); depth ``(B, H, W)`` max-normalised; edges = the detector on the *real*
  image (card §4), or the condition itself when no image is given;
- :meth:`ConditionReward.align` ``(pred, target) -> (pred, target)`` matching ``ctrl_u_reward_terms``' contract
  (labels nearest-resized to the logits; depth bilinear to the target and max-normalised; edges bilinear);
- ``forward(samples, prompts=None, condition=..., target=...)`` → ``(B,)`` = −(per-image consistency loss l),
  higher is better (CE for segmentation, squared error for depth / edges — the ControlNet++ losses).

Tiny random versions (``tiny=True``) build the same transformers classes with small widths, no download.
Weights: ``weights=`` a local folder, else the hub id of the class (offline → :class:`WeightsNotFoundError`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from genalign.registry import rewards as REWARDS
from genalign.rewards.base import Reward, WeightsNotFoundError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_images(x: torch.Tensor) -> torch.Tensor:
    """Validate images ``(B, 3|1, H, W)`` in [0, 1] and return them as fp32 ``(B, 3, H, W)`` (grey expanded).

    Raises:
        ValueError: another rank or channel count.
    """
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 3, H, W) in [0, 1], got {tuple(x.shape)}")
    return x.float().expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.float()


def grey(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3|1, H, W)`` → ``(B, 1, H, W)`` channel mean (differentiable)."""
    return check_images(images).mean(dim=1, keepdim=True)


def sobel_magnitude(images: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of the grey image, ``(B, 1, H, W)`` ≥ 0 (replicate padding; differentiable)."""
    g = grey(images)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=g.device) / 8.0
    k = torch.stack([kx, kx.t()])[:, None]  # (2, 1, 3, 3)
    d = F.conv2d(F.pad(g, (1, 1, 1, 1), mode="replicate"), k)
    return torch.sqrt((d ** 2).sum(dim=1, keepdim=True) + 1e-12)


# -- condition-consistency losses shared by the rewards and Ctrl-U / ControlNet++ (ctrl_u.md §2.1) --------
TASKS = ("segmentation", "depth", "hed", "lineart")


def validate_condition_pair(pred: torch.Tensor, target: torch.Tensor, task: str, ignore_index: int = 255) -> None:
    """Check a reward-model output against its (aligned) condition target before a consistency loss.

    Expected: segmentation logits ``(B, K, h, w)`` with integer labels ``(B, h, w)`` in [0, K) or ``ignore_index``;
    depth ``(B, H, W)`` and target of the same shape; hed/lineart ``(B, C, H, W)`` and target of the same shape.

    Raises:
        ValueError: a shape, dtype or label-range problem (the message says which and how to fix it).
    """
    if task == "segmentation":
        if pred.ndim != 4:
            raise ValueError(f"segmentation predictions must be (B, K, h, w) logits, got {tuple(pred.shape)}")
        if target.ndim != 3 or target.shape[0] != pred.shape[0] or target.shape[-2:] != pred.shape[-2:]:
            raise ValueError(
                f"segmentation target must be (B, h, w) labels at the logits' resolution {tuple(pred.shape[-2:])} "
                f"(nearest-resize labels first), got {tuple(target.shape)}"
            )
        if target.dtype.is_floating_point:
            raise ValueError("segmentation target must be an integer label map")
        bad = (target != ignore_index) & ((target < 0) | (target >= pred.shape[1]))
        if bad.any():
            raise ValueError(f"segmentation labels must be in [0, {pred.shape[1]}) or {ignore_index}")
    elif task == "depth":
        if pred.ndim != 3 or target.shape != pred.shape:
            raise ValueError(
                f"depth predictions and target must both be (B, H, W) max-normalised maps, got "
                f"{tuple(pred.shape)} and {tuple(target.shape)}"
            )
    else:
        if pred.ndim != 4 or target.shape != pred.shape:
            raise ValueError(
                f"{task} predictions and target must both be (B, C, H, W) detector maps, got "
                f"{tuple(pred.shape)} and {tuple(target.shape)}"
            )


def per_pixel_condition_loss(pred: torch.Tensor, target: torch.Tensor, task: str, ignore_index: int) -> torch.Tensor:
    """l(p), (B, H, W): CE (seg, 0 at ignored pixels), squared error (depth), channel-mean squared error (edges)."""
    if task == "segmentation":
        return F.cross_entropy(pred, target.long(), ignore_index=ignore_index, reduction="none")
    if task == "depth":
        return (pred - target.to(torch.float32)) ** 2
    return ((pred - target.to(torch.float32)) ** 2).mean(dim=1)


_VALID_EPS = 1e-8  # guards the division when every pixel is ignored


def per_image_condition_reward(
    l: torch.Tensor, target: torch.Tensor, task: str, ignore_index: int, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-image mean of a per-pixel loss ``l`` ``(B, H, W)`` → ``(B,)``, optionally weighted per pixel; for
    segmentation only over pixels whose label is not ``ignore_index``."""
    if weight is not None:
        l = l * weight
    if task == "segmentation":
        valid = (target != ignore_index).to(torch.float32)
        return (valid * l).sum(dim=(-1, -2)) / (valid.sum(dim=(-1, -2)) + _VALID_EPS)
    return l.mean(dim=(-1, -2))


def normalize_depth_by_max(depth: torch.Tensor) -> torch.Tensor:
    """Divide each (H, W) depth map of a (B, H, W) tensor by its per-image max ([code] depth reward preprocessing)."""
    if depth.ndim != 3:
        raise ValueError(f"depth must be (B, H, W), got {tuple(depth.shape)}")
    d = depth.to(torch.float32)
    return d / d.flatten(1).amax(dim=1).view(-1, 1, 1)


class ConditionReward(Reward):
    """Base of the condition-consistency rewards (see the module docstring for the interface)."""

    task: ClassVar[str] = "segmentation"
    differentiable = True
    input_format = "images (B, 3, H, W) in [0, 1] + condition=(B, 3, H, W) in [0, 1] (or target=...)"
    ignore_index: int = 255

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Reward-model output on ``images`` (B, 3, H, W) in [0, 1], with autograd (see module docstring)."""
        raise NotImplementedError(f"{type(self).__name__} must implement predict (the condition from images)")

    def target_from_condition(self, condition: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """Loss target of a condition ``(B, 3, H, W)`` in [0, 1] (see module docstring)."""
        raise NotImplementedError(f"{type(self).__name__} must implement target_from_condition")

    def align(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bring ``pred`` and ``target`` to the shapes of the Ctrl-U / ControlNet++ reward terms.

        segmentation: labels nearest-resized to the logits' size (card §2.1.5); depth: prediction bilinear to the
        target size, then divided by its per-image max (card: ``predicted_depth`` → 512, /max); edges: bilinear.
        """
        if self.task == "segmentation":
            if target.shape[-2:] != pred.shape[-2:]:
                target = F.interpolate(target[:, None].float(), size=pred.shape[-2:], mode="nearest")[:, 0].long()
            return pred, target
        if self.task == "depth":
            if pred.shape[-2:] != target.shape[-2:]:
                pred = F.interpolate(pred[:, None], size=target.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            return normalize_depth_by_max(pred.clamp_min(0) + 1e-6), target
        if pred.shape[-2:] != target.shape[-2:]:
            pred = F.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return pred, target

    def per_pixel_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Aligned per-pixel consistency loss l(p), ``(B, h, w)`` (CE with ignore; squared error; channel-mean
        squared error) — the ControlNet++ losses (ctrl_u.md §2.1 step 5)."""
        return per_pixel_condition_loss(pred.float(), target, self.task, self.ignore_index)

    def consistency_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-image mean of :meth:`per_pixel_loss` ``(B,)`` (segmentation: over pixels with label ≠ 255)."""
        pred, target = self.align(pred, target)
        return per_image_condition_reward(self.per_pixel_loss(pred, target), target, self.task, self.ignore_index)

    @torch.no_grad()
    def condition_from_image(self, images: torch.Tensor) -> torch.Tensor:
        """Make a condition image ``(B, 3, H, W)`` in [0, 1] from real images with this detector (card §4: the
        MultiGen-20M conditions are detector outputs on the real image). segmentation: argmax labels as palette
        colours (or label/255); depth: prediction resized and max-normalised; edges: the edge map."""
        x = check_images(images)
        size = x.shape[-2:]
        pred = self.predict(x)
        if self.task == "segmentation":
            lab = F.interpolate(pred.argmax(1, keepdim=True).float(), size=size, mode="nearest")[:, 0].long()
            pal = getattr(self, "palette", None)
            if pal is not None:
                return (pal.to(lab.device)[lab + getattr(self, "palette_shift", 1)] / 255.0).permute(0, 3, 1, 2)
            return (lab.float() / 255.0)[:, None].repeat(1, 3, 1, 1)
        if self.task == "depth":
            d = F.interpolate(pred[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].clamp_min(0)
            return normalize_depth_by_max(d + 1e-6)[:, None].repeat(1, 3, 1, 1)
        e = F.interpolate(pred, size=size, mode="bilinear", align_corners=False) if pred.shape[-2:] != size else pred
        return e[:, :1].clamp(0, 1).repeat(1, 3, 1, 1)

    def forward(self, samples: torch.Tensor, prompts: list[str] | None = None, condition: torch.Tensor | None = None,
                target: torch.Tensor | None = None, **conditions) -> torch.Tensor:
        """``(B,)`` = −consistency loss between the prediction on ``samples`` and the condition (higher is better).

        Raises:
            ValueError: neither ``condition`` nor ``target`` given.
        """
        if target is None:
            if condition is None:
                raise ValueError(f"reward {self.registry_name!r} needs condition=(B, 3, H, W) or target=")
            target = self.target_from_condition(condition.to(samples.device))
        return -self.consistency_loss(self.predict(samples), target.to(samples.device))


# -- weight-free rewards --------------------------------------------------------------------------------------
@REWARDS.register("digit_stroke_mask", "digits: soft stroke segmenter (2 classes), consistency with a stroke mask")
class DigitStrokeMask(ConditionReward):
    """Differentiable 2-class stroke segmenter for the digits demo: logits ``(−z/2, z/2)``, z = k·(grey − θ).

    Input images ``(B, 3, H, W)`` in [0, 1]; ``predict`` → logits ``(B, 2, H, W)`` (class 1 = stroke).
    ``target_from_condition``: the stroke mask condition (grey > 0.5) → labels ``(B, H, W)`` in {0, 1}.

    Args:
        threshold: θ, grey level of the stroke boundary (0.5: half ink).
        sharpness: k (per unit grey); 12 ⇒ p(stroke) = 0.998 at grey 1 and 0.002 at 0.
        device: where to run (no parameters).

    Source: genalign's own (card §4 contract: the condition is made by the detector on the real image).
    """

    task = "segmentation"

    def __init__(self, threshold: float = 0.5, sharpness: float = 12.0, device=None):
        super().__init__()
        self.threshold, self.sharpness = float(threshold), float(sharpness)
        self.freeze()

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Stroke logits ``(B, 2, H, W)`` (class 1 = stroke), differentiable in the images."""
        z = self.sharpness * (grey(images) - self.threshold)
        return torch.cat([-z / 2, z / 2], dim=1)

    def target_from_condition(self, condition, images=None):
        """Labels ``(B, H, W)`` int64: 1 where the condition's grey level > 0.5."""
        return (grey(condition)[:, 0] > 0.5).long()

    @torch.no_grad()
    def condition_from_image(self, images: torch.Tensor) -> torch.Tensor:
        """The digits condition: the real digit's stroke mask (grey > 0.5) as a 0/1 RGB image ``(B, 3, H, W)``."""
        return self.mask_of(images).float()[:, None].repeat(1, 3, 1, 1)

    @staticmethod
    def mask_of(images: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        """Hard stroke mask ``(B, H, W)`` bool = grey > threshold (the digits condition and its evaluation)."""
        return grey(images)[:, 0] > threshold


@REWARDS.register("soft_edges", "differentiable Sobel soft edges; consistency with an edge-map condition")
class SoftEdges(ConditionReward):
    """Soft edge detector in torch: e = 1 − exp(−|∇I|/scale), ``(B, 1, H, W)`` in [0, 1), differentiable.

    ``target_from_condition(condition, images)``: the detector on the real image when ``images`` is given (card
    §4, HED/lineart), else the condition's grey level (an edge-map condition made by this detector).

    Args:
        scale: Sobel magnitude (grey units per pixel, kernel normalised by 1/8) giving e = 1 − 1/e; 0.1 default.

    Source: genalign's own (analogue of the differentiable lineart detector, ctrl_u.md §6.7).
    """

    task = "lineart"
    weight_free = True

    def __init__(self, scale: float = 0.1, device=None):
        super().__init__()
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)
        self.freeze()

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Soft edges ``(B, 1, H, W)`` in [0, 1), differentiable."""
        return 1 - torch.exp(-sobel_magnitude(images) / self.scale)

    def target_from_condition(self, condition, images=None):
        """Edge target ``(B, 1, H, W)``: the detector on ``images`` (real) when given, else the condition's grey."""
        if images is not None:
            return self.predict(images).detach()
        return grey(condition)


@REWARDS.register("canny", "kornia Canny edges (binary, not differentiable); consistency with an edge map")
class CannyEdges(ConditionReward):
    """Canny edges through ``kornia.filters.canny``: ``predict`` → ``(B, 1, H, W)`` in {0, 1}.

    Not differentiable (hysteresis thresholding), like the HED reward of the official code (ctrl_u.md §6.7): as
    a training reward its gradient is zero — a warning is logged once. Use it for evaluation or with
    ``soft=True`` (kornia's differentiable gradient magnitude, normalised to [0, 1] per image).

    Args:
        low_threshold, high_threshold: kornia hysteresis thresholds (0.1, 0.2 defaults).
        soft: return the magnitude instead of the binary map (differentiable).

    Raises:
        ImportError: kornia not installed (``pip install kornia``).
    """

    task = "hed"
    weight_free = True

    def __init__(self, low_threshold: float = 0.1, high_threshold: float = 0.2, soft: bool = False, device=None):
        super().__init__()
        try:
            import kornia  # noqa: F401
        except ImportError:
            raise ImportError("reward 'canny' needs kornia (pip install kornia)") from None
        self.low, self.high, self.soft = float(low_threshold), float(high_threshold), bool(soft)
        self.differentiable = self.soft  # type: ignore[misc]
        self.freeze()

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Canny edges ``(B, 1, H, W)`` in {0, 1} (or the normalised magnitude with ``soft``)."""
        import kornia

        mag, edges = kornia.filters.canny(check_images(images), self.low, self.high)
        if self.soft:
            return mag / (mag.flatten(1).amax(1).view(-1, 1, 1, 1) + 1e-8)
        if torch.is_grad_enabled() and images.requires_grad and not getattr(self, "_warned", False):
            logger.warning("reward 'canny': binary Canny edges carry no gradient; the reward term is a constant")
            self._warned = True
        return edges.float()

    def target_from_condition(self, condition, images=None):
        """Edge target ``(B, 1, H, W)``: Canny on ``images`` when given, else the condition binarised at 0.5."""
        if images is not None:
            return self.predict(images).detach()
        return (grey(condition) > 0.5).float()


def build_condition_reward(name: str, kwargs: dict | None = None, device=None) -> "ConditionReward":
    """Build the registered condition reward ``name`` with ``kwargs`` (e.g. ``weights``, ``tiny``, ``palette``).

    Raises:
        KeyError: unknown reward name. ValueError: ``name`` is not a :class:`ConditionReward` (names it).
    """
    cls = REWARDS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, ConditionReward)):
        raise ValueError(f"objective.reward: {name!r} is not a condition reward (ConditionReward)")
    reward = cls(device=device, **dict(kwargs or {}))
    return reward.to(device) if device is not None else reward


# -- transformers models --------------------------------------------------------------------------------------
def load_pretrained(cls, weights: str, what: str):
    """``cls.from_pretrained(weights)`` (a transformers model class) with a one-line offline error.

    Raises:
        WeightsNotFoundError: ``weights`` is not a local folder and cannot be downloaded (names reward ``what``).
    """
    try:
        return cls.from_pretrained(weights)
    except (OSError, ValueError, EnvironmentError) as err:
        if Path(weights).is_dir():
            raise
        raise WeightsNotFoundError(
            f"reward {what!r}: cannot load {weights!r} ({type(err).__name__}). Provide a local folder with "
            f"`kwargs: {{weights: /path}}` (download https://huggingface.co/{weights} on a machine with network) "
            "or unset HF_HUB_OFFLINE."
        ) from None


@REWARDS.register("dpt_depth", "DPT depth (transformers, dpt-hybrid-midas); squared error to a depth condition")
class DPTDepth(ConditionReward):
    """``DPTForDepthEstimation``: images resized to ``size`` (384) and normalised with mean = std = 0.5
    (card §2.1.4); ``predict`` → ``predicted_depth`` ``(B, h, w)`` (relative inverse depth, larger = nearer).
    ``target_from_condition`` → RGB mean divided by its per-image max ``(B, H, W)``; :meth:`align` resizes and
    max-normalises the prediction.

    Args:
        weights: local folder / hub id (default ``Intel/dpt-hybrid-midas``, the official reward model).
        tiny: random tiny DPT (ViT, 4 layers) for tests. size: input side (384).
    """

    task = "depth"
    default_weights = "Intel/dpt-hybrid-midas"

    def __init__(self, weights: str | None = None, tiny: bool = False, size: int = 384, device=None):
        super().__init__()
        from transformers import DPTConfig, DPTForDepthEstimation

        self.size = int(size)
        if tiny and weights is None:
            torch.manual_seed(0)
            self.model = DPTForDepthEstimation(DPTConfig(
                hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, image_size=32,
                patch_size=8, neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8, backbone_out_indices=[0, 1, 2, 3]))
        else:
            self.model = load_pretrained(DPTForDepthEstimation, weights or self.default_weights, "dpt_depth")
        if device is not None:
            self.to(device)
        self.freeze()

    def predict(self, images):
        """``predicted_depth`` ``(B, h, w)`` fp32 (relative inverse depth; :meth:`align` resizes / normalises)."""
        x = check_images(images)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.model(pixel_values=(x - 0.5) / 0.5).predicted_depth.float()

    def target_from_condition(self, condition, images=None):
        """Depth target ``(B, H, W)``: the condition's RGB mean divided by its per-image max."""
        return normalize_depth_by_max(check_images(condition).mean(1) + 1e-6)


__all__ = ["ConditionReward", "DigitStrokeMask", "SoftEdges", "CannyEdges", "DPTDepth", "check_images", "grey",
           "sobel_magnitude", "per_pixel_condition_loss", "per_image_condition_reward", "normalize_depth_by_max",
           "load_pretrained", "build_condition_reward", "validate_condition_pair", "TASKS", "IMAGENET_MEAN",
           "IMAGENET_STD"]
