"""ImageReward v1.0 on stock transformers BLIP modules (no ``image-reward`` package).

``h = BERT(ids, mask, encoder_hidden_states=ViT(x))[:, 0]``; ``r = (head(h) − 0.16717362830052426) /
1.0333394966054072``. ViT-L/16 at 224 px (timm names upstream) → ``transformers.BlipVisionModel``; BERT-base
with cross-attention → ``BlipTextModel`` (built with ``is_decoder=True`` so the cross-attention layers exist,
called with ``is_decoder=False`` for bidirectional self-attention, as BLIP's ``mode="multimodal"``); the head is
the same five-Linear, activation-free MLP as the LAION aesthetic head, on 768-d.

Source: Xu et al. 2023, "ImageReward" (arXiv 2304.05977) §3; THUDM/ImageReward@c1392c6
``ImageReward/ImageReward.py`` (``score``/``score_gard``, constants, max_length 35), ``models/BLIP/blip_pretrain.py``,
``med_config.json``; key map in rewards.md §3 (checked against the HF key listing).
"""

from __future__ import annotations

import os
import re
import tempfile
from functools import lru_cache

import torch

from genalign.registry import rewards as REWARDS
from genalign.rewards.aesthetic import MLPHead
from genalign.rewards.base import Reward, WeightEntry, load_state_dict, resolve_weight_file
from genalign.rewards.clip import check_prompts, resolve_hf_folder
from genalign.rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_reference_pixels, clip_resize_crop, normalize, to_rgb

#: reward normalisation constants of ImageReward v1.0 (``ImageReward.py``: ``self.mean``, ``self.std``)
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072

#: keys of the upstream checkpoint that have no counterpart here (documented drops, rewards.md §3)
DROPPED_PREFIXES = ("vision_proj.", "text_proj.")
DROPPED_SUFFIXES = ("embeddings.position_ids",)

_VIS_BLOCK = {
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def convert_imagereward_key(key: str) -> str | None:
    """Map one upstream ``ImageReward.pt`` key to this module's name; ``None`` for a documented drop.

    ``blip.`` prefix removed; ``visual_encoder.{cls_token,pos_embed,patch_embed.proj}`` →
    ``vision_model.embeddings.{class_embedding,position_embedding,patch_embedding}``;
    ``visual_encoder.blocks.N.<timm>`` → ``vision_model.encoder.layers.N.<hf>``; ``visual_encoder.norm`` →
    ``vision_model.post_layernorm``; ``text_encoder.*`` unchanged; ``mlp.layers.*`` unchanged.

    Raises:
        KeyError: a ``visual_encoder`` key with an unknown layout (never guessed silently).
    """
    k = key[len("blip."):] if key.startswith("blip.") else key
    if k.startswith(DROPPED_PREFIXES) or k.endswith(DROPPED_SUFFIXES):
        return None
    if k.startswith("visual_encoder."):
        rest = k[len("visual_encoder."):]
        simple = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding"}
        if rest in simple:
            return "vision_model." + simple[rest]
        if rest.startswith("patch_embed.proj."):
            return "vision_model.embeddings.patch_embedding." + rest[len("patch_embed.proj."):]
        if rest.startswith("norm."):
            return "vision_model.post_layernorm." + rest[len("norm."):]
        m = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", rest)
        if m and m.group(2) in _VIS_BLOCK:
            return f"vision_model.encoder.layers.{m.group(1)}.{_VIS_BLOCK[m.group(2)]}.{m.group(3)}"
        raise KeyError(f"unknown ImageReward visual_encoder key {key!r}")
    return k


def convert_imagereward_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Convert a whole upstream state dict; returns ``(converted, dropped_keys)``."""
    out, dropped = {}, []
    for k, v in sd.items():
        nk = convert_imagereward_key(k)
        if nk is None:
            dropped.append(k)
        else:
            out[nk] = v
    return out, dropped


def imagereward_configs(tiny: bool = False):
    """``(BlipVisionConfig, BlipTextConfig)`` of ImageReward v1.0, or the tiny test variant (rewards.md §3).

    ``initializer_range=0.02`` is set explicitly: BLIP's vision default (1e-10) makes a random tower nearly
    constant, so tiny scores would not depend on the image.
    """
    from transformers import BlipTextConfig, BlipVisionConfig

    if tiny:
        v = BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=224, patch_size=16, layer_norm_eps=1e-6, initializer_range=0.02,
                             hidden_act="gelu")
        t = BlipTextConfig(vocab_size=30524, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64,
                           is_decoder=True, initializer_range=0.02)
        return v, t
    v = BlipVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         image_size=224, patch_size=16, layer_norm_eps=1e-6, initializer_range=0.02, hidden_act="gelu")
    t = BlipTextConfig(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, encoder_hidden_size=1024, max_position_embeddings=512,
                       layer_norm_eps=1e-12, hidden_act="gelu", is_decoder=True, pad_token_id=0,
                       initializer_range=0.02)
    return v, t


@lru_cache(maxsize=1)
def tiny_bert_tokenizer():
    """Offline WordPiece tokeniser for tiny builds: a few words + ``[DEC]`` (bos) and ``[ENC]`` (tests only)."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "photo", "of", "cat", "dog", "red", "ball",
             "on", "in", "blue", "sky", "house", "##s"]
    d = tempfile.mkdtemp(prefix="genalign-bert-tok-")
    with open(os.path.join(d, "vocab.txt"), "w") as f:
        f.write("\n".join(words) + "\n")
    return _add_blip_tokens(BertTokenizer(os.path.join(d, "vocab.txt")))


def _add_blip_tokens(tok):
    # BLIP's init_tokenizer: [DEC] as bos, [ENC] as an additional special token → 30524 ids for bert-base
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


@REWARDS.register("imagereward-v1.0", "ImageReward v1.0 (BLIP ViT-L/16 + BERT cross-attention + MLP head)")
class ImageReward(Reward):
    """ImageReward v1.0: ``r = (head(h_CLS) − 0.16717) / 1.03334``, roughly standardised (mostly in [−2, 2]).

    Args:
        weights: local ``ImageReward.pt`` (plain state dict, upstream key layout, read with ``weights_only``) or
            a safetensors file in either layout; default hub ``THUDM/ImageReward``.
        tokenizer_weights: local ``bert-base-uncased`` tokenizer folder; default hub ``google-bert/bert-base-uncased``.
        tiny: tiny BLIP (``imagereward_configs(tiny=True)``) with random weights and an offline toy tokeniser;
            ``weights`` may point at a tiny checkpoint in the upstream layout.
        device, preprocess: ``"tensor"`` (differentiable CLIP resize-crop, upstream ``score_gard``) or
            ``"reference"`` (PIL processor path).

    Shapes: ``(B, 3, H, W)`` [0, 1] + B prompts → ``(B,)`` float32. Text: ``max_length=35`` padding/truncation,
    ``[CLS]`` kept.

    Raises:
        WeightsNotFoundError: weights/tokeniser unavailable offline. KeyError: checkpoint keys missing or
        unexpected after conversion (beyond the documented drops ``vision_proj``, ``text_proj``, ``position_ids``).

    Source: Xu et al. 2023 (arXiv 2304.05977); THUDM/ImageReward ``ImageReward.py``.
    """

    modality = "image"
    kind = "instance"
    differentiable = True
    input_format = "images (B, 3, H, W) float in [0, 1] + B prompts"
    weights = WeightEntry("THUDM/ImageReward", "ImageReward.pt", licence="apache-2.0")
    tokenizer_entry = WeightEntry("google-bert/bert-base-uncased", None, licence="apache-2.0")
    max_length = 35

    def __init__(self, weights: str | None = None, tiny: bool = False, device: str | torch.device | None = None,
                 preprocess: str = "tensor", tokenizer_weights: str | None = None):
        super().__init__()
        from transformers import BertTokenizer, BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        if preprocess not in ("tensor", "reference"):
            raise ValueError(f"preprocess must be 'tensor' or 'reference', got {preprocess!r}")
        self.preprocess_mode = preprocess
        what = f"reward {self.registry_name!r}"
        path = None
        if not tiny or weights is not None:
            assert self.weights is not None
            path = resolve_weight_file(self.weights, weights, what=what)
        if tiny:
            self.tokenizer = tiny_bert_tokenizer()
        else:
            folder = resolve_hf_folder(self.tokenizer_entry.repo_id, ["vocab.txt"], ["tokenizer_config.json"],
                                       path=tokenizer_weights, what=what)
            self.tokenizer = _add_blip_tokens(BertTokenizer.from_pretrained(str(folder)))
        vcfg, tcfg = imagereward_configs(tiny)
        torch.manual_seed(0)
        self.vision_model = BlipVisionModel(vcfg)
        self.text_encoder = BlipTextModel(tcfg, add_pooling_layer=False)
        self.mlp = MLPHead(tcfg.hidden_size)
        self.register_buffer("mean", torch.tensor(IMAGEREWARD_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGEREWARD_STD), persistent=False)
        self.dropped_keys: list[str] = []
        if path is not None:
            self.load_upstream(load_state_dict(path))
        self.image_size = int(vcfg.image_size)
        if device is not None:
            self.to(device)
        self.freeze()

    def load_upstream(self, sd: dict[str, torch.Tensor]) -> list[str]:
        """Load an upstream-layout (or already converted) state dict strictly; returns the dropped keys.

        Raises:
            KeyError: missing or unexpected keys after conversion.
        """
        converted, dropped = convert_imagereward_state_dict(sd)
        missing, unexpected = self.load_state_dict(converted, strict=False)
        if missing or unexpected:
            raise KeyError(f"ImageReward checkpoint: missing {missing[:8]}, unexpected {unexpected[:8]}")
        self.dropped_keys = dropped
        return dropped

    @property
    def device(self) -> torch.device:
        return self.mlp.layers[0].weight.device

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        images = to_rgb(images)
        if self.preprocess_mode == "reference":
            return clip_reference_pixels(images, self.image_size)
        return normalize(clip_resize_crop(images, self.image_size), CLIP_MEAN, CLIP_STD)

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": tok["input_ids"].to(self.device), "attention_mask": tok["attention_mask"].to(self.device)}

    def features(self, samples: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Multimodal ``[CLS]`` features ``(B, hidden)`` (the head's input)."""
        prompts = check_prompts(prompts, samples.shape[0])
        img = self.vision_model(pixel_values=self.pixels(samples).to(self.device)).last_hidden_state
        atts = torch.ones(img.shape[:2], dtype=torch.long, device=img.device)
        tok = self.tokenize(prompts)
        out = self.text_encoder(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                                encoder_hidden_states=img, encoder_attention_mask=atts, is_decoder=False)
        return out.last_hidden_state[:, 0, :].float()

    def forward(self, samples: torch.Tensor, prompts: list[str] | None = None, **conditions) -> torch.Tensor:
        raw = self.mlp(self.features(samples, prompts)).squeeze(-1)
        return ((raw - self.mean) / self.std).float()


REWARDS.add("imagereward", ImageReward, "alias of imagereward-v1.0")

__all__ = [
    "IMAGEREWARD_MEAN",
    "IMAGEREWARD_STD",
    "ImageReward",
    "convert_imagereward_key",
    "convert_imagereward_state_dict",
    "imagereward_configs",
]
