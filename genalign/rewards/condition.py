"""Condition-consistency rewards: a perception model predicts the condition back from a generated image.

Used by ControlNet++ / Ctrl-U (ctrl_u.md §2.1 step 4–5) as *reward models* and by the evaluation helpers
(:mod:`genalign.evaluation.condition`). Every member is a :class:`ConditionReward` with one ``task``:

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


def _check_images(x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 3, H, W) in [0, 1], got {tuple(x.shape)}")
    return x.float().expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.float()


def grey(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3|1, H, W)`` → ``(B, 1, H, W)`` channel mean (differentiable)."""
    return _check_images(images).mean(dim=1, keepdim=True)


def labels_from_palette(condition: torch.Tensor, palette: torch.Tensor, shift: int = 1,
                        ignore_index: int = 255) -> torch.Tensor:
    """RGB segmentation condition → class labels by nearest palette colour.

    Args:
        condition: ``(B, 3, H, W)`` in [0, 1].
        palette: ``(K, 3)`` colours in 0..255; row 0 is "unlabelled" when ``shift = 1`` (ADE20K's 151-row palette).
        shift: labels = nearest row − shift; rows below ``shift`` become ``ignore_index`` (card §4: index − 1,
            0 → 255). Ties go to the first row (argmin), as in the official code (ADE20K rows 7 / 49).

    Returns:
        ``(B, H, W)`` int64.

    Source: ControlNet++ / Ctrl-U ``train/utils.py`` (label from the RGB condition), ctrl_u.md §4.
    """
    c = condition.float() * 255.0
    pal = torch.as_tensor(palette, dtype=torch.float32, device=c.device)
    d = ((c.permute(0, 2, 3, 1)[..., None, :] - pal) ** 2).sum(-1)  # (B, H, W, K)
    idx = d.argmin(-1)
    lab = idx - shift
    return torch.where(idx < shift, torch.full_like(lab, ignore_index), lab)


def sobel_magnitude(images: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of the grey image, ``(B, 1, H, W)`` ≥ 0 (replicate padding; differentiable)."""
    g = grey(images)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=g.device) / 8.0
    k = torch.stack([kx, kx.t()])[:, None]  # (2, 1, 3, 3)
    d = F.conv2d(F.pad(g, (1, 1, 1, 1), mode="replicate"), k)
    return torch.sqrt((d ** 2).sum(dim=1, keepdim=True) + 1e-12)


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
        """Bring ``pred`` and ``target`` to the shapes of :func:`genalign.objectives.ctrl_u.ctrl_u_reward_terms`.

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
        x = _check_images(images)
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

        mag, edges = kornia.filters.canny(_check_images(images), self.low, self.high)
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


# -- transformers models --------------------------------------------------------------------------------------
def _from_pretrained(cls, weights: str, what: str):
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


class _HFSegmentation(ConditionReward):
    """Common code of the transformers segmenters: resize → ImageNet normalisation → logits (B, K, h, w).

    Args:
        weights: local folder or hub id (default: the class's ``default_weights``).
        tiny: random tiny model of the same class (tests), ``num_labels`` classes.
        size: input side in pixels (images are bilinearly resized; 512 = the official resolution).
        palette: ``(K+shift, 3)`` colours 0..255 (a nested list or a path to a JSON file) mapping an RGB
            condition to labels (ADE20K: the 151-row palette of ControlNet++ ``train/utils.py`` = [0, 0, 0] +
            mmseg's 150-row ADE20K palette, row 0 = unlabelled → 255; not shipped). None: the condition's first
            channel ·255 is the label index.
        num_labels: classes of the tiny model.
    """

    task = "segmentation"
    default_weights: ClassVar[str] = ""

    def __init__(self, weights: str | None = None, tiny: bool = False, size: int = 512, palette=None,
                 palette_shift: int = 1, num_labels: int = 5, device=None):
        super().__init__()
        self.size = int(size)
        if isinstance(palette, (str, Path)):
            import json

            palette = json.loads(Path(palette).read_text())
        self.palette = None if palette is None else torch.as_tensor(palette, dtype=torch.float32)
        self.palette_shift = int(palette_shift)
        self.model = self._tiny(num_labels) if tiny and weights is None else \
            _from_pretrained(self._cls(), weights or self.default_weights, self.registry_name)
        if device is not None:
            self.to(device)
        self.freeze()

    def _inputs(self, images):
        from genalign.rewards.preprocess import normalize

        x = _check_images(images)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return normalize(x, IMAGENET_MEAN, IMAGENET_STD)

    def predict(self, images):
        """Segmentation logits ``(B, K, h, w)`` fp32 (model resolution; :meth:`align` resizes the labels)."""
        return self.model(pixel_values=self._inputs(images)).logits.float()

    def target_from_condition(self, condition, images=None):
        """Labels ``(B, H, W)`` int64: nearest palette colour (shifted, 0 → 255) or channel-0·255."""
        if self.palette is not None:
            return labels_from_palette(condition, self.palette, self.palette_shift, self.ignore_index)
        return (condition[:, 0].float() * 255).round().long()


@REWARDS.register("segformer", "Segformer segmentation (transformers); CE consistency with a label-map condition")
class SegformerSeg(_HFSegmentation):
    """``SegformerForSemanticSegmentation`` (logits at ¼ resolution, like mmseg ``mode='tensor'``).
    Default weights ``nvidia/segformer-b0-finetuned-ade-512-512`` [unknown → rec.: a light alternative to the
    official mmseg UperNet-R50]."""

    default_weights = "nvidia/segformer-b0-finetuned-ade-512-512"

    def _cls(self):
        from transformers import SegformerForSemanticSegmentation

        return SegformerForSemanticSegmentation

    def _tiny(self, n):
        from transformers import SegformerConfig, SegformerForSemanticSegmentation

        torch.manual_seed(0)
        return SegformerForSemanticSegmentation(SegformerConfig(
            num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3],
            strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=n))


@REWARDS.register("upernet", "UperNet segmentation (transformers); the Ctrl-U ADE20K reward model family")
class UperNetSeg(_HFSegmentation):
    """``UperNetForSemanticSegmentation`` (HF upsamples logits to the input size; labels are resized to match).
    Default weights ``openmmlab/upernet-convnext-small`` [unknown → rec.: the official reward is mmseg
    UperNet-R50 (ADE20K); equivalence of HF weights to it is unverified, ctrl_u.md §5]."""

    default_weights = "openmmlab/upernet-convnext-small"

    def _cls(self):
        from transformers import UperNetForSemanticSegmentation

        return UperNetForSemanticSegmentation

    def _tiny(self, n):
        from transformers import ConvNextConfig, UperNetConfig, UperNetForSemanticSegmentation

        torch.manual_seed(0)
        bc = ConvNextConfig(num_channels=3, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                            out_features=["stage1", "stage2", "stage3", "stage4"])
        return UperNetForSemanticSegmentation(UperNetConfig(backbone_config=bc, hidden_size=16, num_labels=n,
                                                            use_auxiliary_head=False))


@REWARDS.register("mask2former", "Mask2Former semantic segmentation (transformers); the ADE20K evaluation model")
class Mask2FormerSeg(_HFSegmentation):
    """``Mask2FormerForUniversalSegmentation`` turned into per-pixel class scores: p(k | pixel) ∝
    Σ_q softmax(class_q)[k]·sigmoid(mask_q) (transformers ``post_process_semantic_segmentation``), and
    ``predict`` returns log p (so CE/KL apply). Default weights ``facebook/mask2former-swin-large-ade-semantic``
    (the card's ADE20K evaluation model, ctrl_u.md §5)."""

    default_weights = "facebook/mask2former-swin-large-ade-semantic"

    def _cls(self):
        from transformers import Mask2FormerForUniversalSegmentation

        return Mask2FormerForUniversalSegmentation

    def _tiny(self, n):
        from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

        torch.manual_seed(0)
        sc = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                        window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
        return Mask2FormerForUniversalSegmentation(Mask2FormerConfig(
            backbone_config=sc, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32,
            dim_feedforward=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2, num_queries=4,
            num_labels=n, common_stride=4))

    def predict(self, images):
        """Log semantic probabilities ``(B, K, h, w)`` (usable as logits by CE / KL)."""
        out = self.model(pixel_values=self._inputs(images))
        cls = out.class_queries_logits.float().softmax(-1)[..., :-1]  # drop the "no object" class
        masks = out.masks_queries_logits.float().sigmoid()
        probs = torch.einsum("bqk,bqhw->bkhw", cls, masks)
        probs = probs / (probs.sum(1, keepdim=True) + 1e-8)
        return torch.log(probs.clamp_min(1e-8))


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
            self.model = _from_pretrained(DPTForDepthEstimation, weights or self.default_weights, "dpt_depth")
        if device is not None:
            self.to(device)
        self.freeze()

    def predict(self, images):
        """``predicted_depth`` ``(B, h, w)`` fp32 (relative inverse depth; :meth:`align` resizes / normalises)."""
        x = _check_images(images)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.model(pixel_values=(x - 0.5) / 0.5).predicted_depth.float()

    def target_from_condition(self, condition, images=None):
        """Depth target ``(B, H, W)``: the condition's RGB mean divided by its per-image max."""
        
        return normalize_depth_by_max(_check_images(condition).mean(1) + 1e-6)


__all__ = ["ConditionReward", "DigitStrokeMask", "SoftEdges", "CannyEdges", "SegformerSeg", "UperNetSeg",
           "Mask2FormerSeg", "DPTDepth", "labels_from_palette", "sobel_magnitude", "grey"]


# -- condition-consistency losses shared by the rewards and Ctrl-U / ControlNet++ (ctrl_u.md §2.1) --------
def per_pixel_condition_loss(pred: torch.Tensor, target: torch.Tensor, task: str, ignore_index: int) -> torch.Tensor:
    """l(p), (B, H, W): CE (seg, 0 at ignored pixels), squared error (depth), channel-mean squared error (edges)."""
    if task == "segmentation":
        return F.cross_entropy(pred, target.long(), ignore_index=ignore_index, reduction="none")
    if task == "depth":
        return (pred - target.to(torch.float32)) ** 2
    return ((pred - target.to(torch.float32)) ** 2).mean(dim=1)


_GATE_EPS = 1e-8  # guards the division when every pixel is ignored


def per_image_condition_reward(
    l: torch.Tensor, target: torch.Tensor, task: str, ignore_index: int, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-image mean of a per-pixel loss ``l`` ``(B, H, W)`` → ``(B,)``, optionally weighted per pixel; for
    segmentation only over pixels whose label is not ``ignore_index``."""
    if weight is not None:
        l = l * weight
    if task == "segmentation":
        valid = (target != ignore_index).to(torch.float32)
        return (valid * l).sum(dim=(-1, -2)) / (valid.sum(dim=(-1, -2)) + _GATE_EPS)
    return l.mean(dim=(-1, -2))


def normalize_depth_by_max(depth: torch.Tensor) -> torch.Tensor:
    """Divide each (H, W) depth map of a (B, H, W) tensor by its per-image max ([code] depth reward preprocessing)."""
    if depth.ndim != 3:
        raise ValueError(f"depth must be (B, H, W), got {tuple(depth.shape)}")
    d = depth.to(torch.float32)
    return d / d.flatten(1).amax(dim=1).view(-1, 1, 1)
