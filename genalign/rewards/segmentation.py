"""Segmentation condition rewards (transformers segmenters) and the label maps of RGB segmentation conditions.

- :func:`ade20k_palette` — the ADE20K 150-class colour table shipped as ``genalign/assets/ade20k_palette.json``
  (mmseg ``ADE20KDataset.METAINFO`` palette with a [0, 0, 0] "unlabelled" row prepended: 151 rows, as ControlNet++ /
  Ctrl-U ``train/utils.py`` use it; ctrl_u.md §4);
- :func:`labels_from_palette` — RGB condition → class labels by nearest palette colour (row − 1, row 0 → 255);
- ``segformer`` / ``upernet`` / ``mask2former`` — :class:`~genalign.rewards.condition.ConditionReward` members over
  transformers ``SegformerForSemanticSegmentation`` / ``UperNetForSemanticSegmentation`` /
  ``Mask2FormerForUniversalSegmentation`` (logits ``(B, K, h, w)``; ImageNet normalisation, card §2.1.4).

Source: ControlNet++ ``liming-ai/ControlNet_Plus_Plus@9ffe264`` / Ctrl-U ``grenoble-zhang/Ctrl-U@704d51d``
``train/utils.py`` (labels from the RGB condition); transformers model classes; mmseg for the palette.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from genalign.registry import rewards as REWARDS
from genalign.rewards.condition import IMAGENET_MEAN, IMAGENET_STD, ConditionReward, check_images, load_pretrained
from genalign.rewards.preprocess import normalize

ADE20K_PALETTE_FILE = "ade20k_palette.json"


@lru_cache(maxsize=1)
def _ade20k_table() -> dict:
    return json.loads(resources.files("genalign").joinpath("assets", ADE20K_PALETTE_FILE).read_text())


def ade20k_palette() -> torch.Tensor:
    """The ADE20K palette ``(151, 3)`` float32 in 0..255: row 0 = [0, 0, 0] (unlabelled), row k = class k − 1.

    Source: open-mmlab/mmsegmentation ``mmseg/datasets/ade.py`` ``ADE20KDataset.METAINFO`` (150 colours, class
    order), with the unlabelled row prepended as in ControlNet++ / Ctrl-U ``train/utils.py`` (ctrl_u.md §4).
    """
    return torch.tensor(_ade20k_table()["palette"], dtype=torch.float32)


def ade20k_classes() -> list[str]:
    """The 150 ADE20K class names in label order (label 0 = "wall"), from the same shipped table."""
    return list(_ade20k_table()["classes"])


def resolve_palette(palette, num_labels: int = 0) -> torch.Tensor | None:
    """A palette setting → ``(K, 3)`` float32 colours in 0..255, or None (labels read from channel 0).

    Args:
        palette: None; ``"ade20k"``; ``"auto"`` (``"ade20k"`` when ``num_labels == 150``, else None); a nested
            list / tensor of RGB rows; or a path to a JSON file holding a list of rows or ``{"palette": rows}``.
        num_labels: classes of the segmentation model (for ``"auto"``).

    Raises:
        FileNotFoundError: a palette path that does not exist. ValueError: rows that are not RGB triples.
    """
    if palette is None:
        return None
    if isinstance(palette, str) and palette == "auto":
        palette = "ade20k" if num_labels == 150 else None
        if palette is None:
            return None
    if isinstance(palette, str) and palette == "ade20k":
        return ade20k_palette()
    if isinstance(palette, (str, Path)):
        path = Path(palette)
        if not path.is_file():
            raise FileNotFoundError(f"reward palette {str(palette)!r}: not a file (use 'ade20k', 'auto', a JSON file "
                                    "or a list of RGB rows)")
        data = json.loads(path.read_text())
        palette = data["palette"] if isinstance(data, dict) else data
    pal = torch.as_tensor(palette, dtype=torch.float32)
    if pal.ndim != 2 or pal.shape[1] != 3:
        raise ValueError(f"reward palette must be (K, 3) RGB rows, got shape {tuple(pal.shape)}")
    return pal


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


class _HFSegmentation(ConditionReward):
    """Common code of the transformers segmenters: resize → ImageNet normalisation → logits (B, K, h, w).

    Args:
        weights: local folder or hub id (default: the class's ``default_weights``).
        tiny: random tiny model of the same class (tests), ``num_labels`` classes.
        size: input side in pixels (images are bilinearly resized; 512 = the official resolution).
        palette: how an RGB condition becomes labels (:func:`resolve_palette`): ``"ade20k"`` (the shipped
            151-row palette, :func:`ade20k_palette`), ``"auto"`` (default: ``"ade20k"`` when the model has 150
            classes, else None), a ``(K+shift, 3)`` nested list of colours 0..255, a path to a JSON file (a list of
            rows or ``{"palette": rows}``), or None (the condition's first channel ·255 is the label index).
        palette_shift: palette rows below it are "unlabelled" (→ ``ignore_index``); 1 for the ADE20K palette.
        num_labels: classes of the tiny model.
    """

    task = "segmentation"
    default_weights: ClassVar[str] = ""

    def __init__(self, weights: str | None = None, tiny: bool = False, size: int = 512, palette="auto",
                 palette_shift: int = 1, num_labels: int = 5, device=None):
        super().__init__()
        self.size = int(size)
        self.model = self._tiny(num_labels) if tiny and weights is None else \
            load_pretrained(self._cls(), weights or self.default_weights, self.registry_name)
        self.palette = resolve_palette(palette, int(getattr(self.model.config, "num_labels", 0)))
        self.palette_shift = int(palette_shift)
        if device is not None:
            self.to(device)
        self.freeze()

    def _inputs(self, images):
        x = check_images(images)
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


__all__ = ["SegformerSeg", "UperNetSeg", "Mask2FormerSeg", "labels_from_palette", "ade20k_palette",
           "ade20k_classes", "resolve_palette", "ADE20K_PALETTE_FILE"]
