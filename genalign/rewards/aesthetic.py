"""LAION aesthetic predictor v2 ("improved aesthetic predictor"): CLIP ViT-L/14 image embedding + MLP head.

``a = head(ê)`` where ``ê`` is the **L2-normalised** 768-d projected CLIP ViT-L/14 image embedding and ``head`` is
``Linear(768,1024) → Dropout(0.2) → Linear(1024,128) → Dropout(0.2) → Linear(128,64) → Dropout(0.1) →
Linear(64,16) → Linear(16,1)`` (keys ``layers.{0,2,4,6,7}``). The ReLUs are commented out upstream, so in eval
mode the head is exactly one affine map (:meth:`MLPHead.affine`). Output on an AVA-like 1–10 scale.

Source: christophschuhmann/improved-aesthetic-predictor@6934dd8 ``simple_inference.py`` and
``sac+logos+ava1-l14-linearMSE.pth`` (Apache-2.0); rewards.md §5. Do not confuse it with
``ava+logos-l14-reluMSE.pth`` (has ReLUs, keys ``layers.{0,3,6,9,11}``; not supported here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genalign.registry import rewards as REWARDS
from genalign.rewards.base import Reward, WeightEntry, load_state_dict, resolve_weight_file
from genalign.rewards.clip import resolve_hf_folder, tiny_clip_config
from genalign.rewards.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    clip_reference_pixels,
    clip_resize_crop,
    normalize,
    to_rgb,
    unwrap_features,
)

#: sha256 of ``sac+logos+ava1-l14-linearMSE.pth`` at christophschuhmann/improved-aesthetic-predictor@6934dd8
#: (rewards.md §5). The hub mirror's byte identity is unverified ⚠, so it is checked only when the file came
#: from the GitHub repo (pass ``head_sha256=AESTHETIC_HEAD_SHA256`` to enforce it).
AESTHETIC_HEAD_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"


class MLPHead(nn.Module):
    """The LAION-aesthetic / ImageReward head: five Linear layers with dropout and **no** activations.

    Keys ``layers.{0,2,4,6,7}.{weight,bias}`` (upstream layout). ``(…, input_size)`` → ``(…, 1)``.
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    @torch.no_grad()
    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Collapse the (eval-mode, activation-free) head to ``(w (input_size,), b ())`` in float64."""
        w = torch.eye(self.input_size, dtype=torch.float64)
        b = torch.zeros(self.input_size, dtype=torch.float64)[None]
        for m in self.layers:
            if isinstance(m, nn.Linear):
                W, bb = m.weight.double(), m.bias.double()
                w = w @ W.T
                b = b @ W.T + bb
        return w[:, 0], b[0, 0]


@REWARDS.register("laion-aesthetic-v2", "LAION aesthetic predictor v2 (CLIP ViT-L/14 + linear MLP head; 1–10 scale)")
class LaionAesthetic(Reward):
    """LAION aesthetic score ``a = head(normalize(CLIP_L14_image_embed(x)))``.

    Args:
        weights: local head file (``sac+logos+ava1-l14-linearMSE.pth`` or its safetensors conversion) overriding
            the hub mirror ``trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth``.
        backbone_weights: local ``openai/clip-vit-large-patch14`` folder (``config.json`` + ``model.safetensors``);
            default: hub.
        head_sha256: expected sha256 of the head file (default none, see :data:`AESTHETIC_HEAD_SHA256`).
        tiny: tiny random CLIP vision tower with a 768-d projection and a random head (tests); ``weights`` may
            still give a real head.
        device, preprocess: as the CLIP rewards (``"tensor"`` differentiable, ``"reference"`` PIL processor).

    Shapes: ``(B, 3, H, W)`` [0, 1] → ``(B,)`` float32 (SD images typically 5–6.5 ⚠). Prompts are ignored.
    Differentiable in ``tensor`` mode (the DDPO/TRL scorers were not: ``no_grad`` + uint8; TRL PR #1585).

    Raises:
        WeightsNotFoundError: head or backbone unavailable offline. ValueError: sha256 mismatch.
        RuntimeError: head file with a different layout (e.g. the ReLU variant).

    Source: improved-aesthetic-predictor ``simple_inference.py``; rewards.md §5.
    """

    modality = "image"
    kind = "instance"
    differentiable = True
    input_format = "images (B, 3, H, W) float in [0, 1] (prompts ignored)"
    weights = WeightEntry("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth", licence="apache-2.0")
    backbone = WeightEntry("openai/clip-vit-large-patch14", None, licence="MIT (unverified for weights)")

    def __init__(self, weights: str | None = None, tiny: bool = False, device: str | torch.device | None = None,
                 preprocess: str = "tensor", backbone_weights: str | None = None, head_sha256: str | None = None):
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        if preprocess not in ("tensor", "reference"):
            raise ValueError(f"preprocess must be 'tensor' or 'reference', got {preprocess!r}")
        self.preprocess_mode = preprocess
        what = f"reward {self.registry_name!r}"
        if tiny and backbone_weights is None:
            torch.manual_seed(0)
            self.vision = CLIPVisionModelWithProjection(tiny_clip_config(projection_dim=768).vision_config)
        else:
            folder = resolve_hf_folder(self.backbone.repo_id, ["config.json", "model.safetensors"],
                                       ["preprocessor_config.json"], path=backbone_weights, what=what)
            self.vision = CLIPVisionModelWithProjection.from_pretrained(str(folder))
        self.head = MLPHead(int(self.vision.config.projection_dim))
        if not tiny or weights is not None:
            entry = WeightEntry(self.weights.repo_id, self.weights.filename, sha256=head_sha256)  # type: ignore[union-attr]
            path = resolve_weight_file(entry, weights, what=what)
            sd = load_state_dict(path)
            self.head.load_state_dict(sd, strict=True)
        self.image_size = int(self.vision.config.image_size)
        if device is not None:
            self.to(device)
        self.freeze()

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        images = to_rgb(images)
        if self.preprocess_mode == "reference":
            return clip_reference_pixels(images, self.image_size)
        return normalize(clip_resize_crop(images, self.image_size), CLIP_MEAN, CLIP_STD)

    def embed(self, images: torch.Tensor, **_) -> torch.Tensor:
        """Unit-norm CLIP image embeddings ``(B, 768)`` (the head's input)."""
        dev = self.head.layers[0].weight.device
        out = self.vision(pixel_values=self.pixels(images).to(dev))
        return F.normalize(unwrap_features(getattr(out, "image_embeds", out)).float(), dim=-1)

    def forward(self, samples: torch.Tensor, prompts: list[str] | None = None, **conditions) -> torch.Tensor:
        return self.head(self.embed(samples)).squeeze(-1).float()


REWARDS.add("aesthetic", LaionAesthetic, "alias of laion-aesthetic-v2")

__all__ = ["AESTHETIC_HEAD_SHA256", "LaionAesthetic", "MLPHead"]
