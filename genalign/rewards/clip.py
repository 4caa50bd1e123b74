"""CLIP-family preference rewards: PickScore v1, HPSv2 / HPSv2.1, CLIPScore.

- **PickScore v1** (Kirstain et al. 2023, arXiv 2305.01569; yuvalkirstain/PickScore README): transformers
  ``CLIPModel`` (CLIP-H/14); ``s = exp(logit_scale) · ⟨î, t̂⟩`` on unit embeddings (stored ``exp`` ≈ 100).
  Probabilities are a softmax over the candidates of *one* prompt (:meth:`PickScore.probs`).
- **HPSv2 / v2.1** (Wu et al. 2023, arXiv 2306.09341; tgxs002/HPSv2 ``hpsv2/img_score.py``): open_clip
  ``ViT-H-14`` with every weight fine-tuned, letterbox preprocessing, **plain cosine** ``⟨î, t̂⟩`` (no logit
  scale, HPSv2 #9). v2.0 and v2.1 scores are not comparable.
- **CLIPScore**: per-sample cosine by default (no clamp, genalign **[recon]**); Hessel et al. 2021
  (arXiv 2104.08718) ``2.5·max(cos, 0)`` as ``definition="hessel"``; the torchmetrics number (batch *mean* of
  ``100·cos``, then clamped at 0) is :func:`clipscore_torchmetrics`.

All rewards accept float RGB ``(B, 3, H, W)`` in [0, 1] and a list of B prompts, return ``(B,)`` float32, and
are differentiable in the pixels with ``preprocess="tensor"`` (the default). Text embeddings are computed without
grad and cached per prompt. ``tiny=True`` builds the same architecture with tiny widths and random weights
(offline: the CLIP BPE tokeniser is rebuilt from the copy shipped inside open_clip).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from genalign.registry import rewards as REWARDS
from genalign.rewards.base import Reward, WeightEntry, WeightsNotFoundError, load_state_dict, resolve_weight_file
from genalign.rewards.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    clip_reference_pixels,
    clip_resize_crop,
    letterbox,
    normalize,
    quantize_uint8,
    to_rgb,
    unwrap_features,
)

logger = logging.getLogger(__name__)

Preprocess = Literal["tensor", "reference"]

# ----------------------------------------------------------------------------------------------------------------
# helpers shared with aesthetic.py


def resolve_hf_folder(repo_id: str, required: list[str], optional: list[str] = (), path: str | None = None,
                      revision: str | None = None, what: str = "reward") -> Path:
    """Local folder holding a transformers checkpoint: ``path`` if given, else the hub files (cache/download).

    Only the listed files are fetched (not the whole repository: PickScore_v1 also ships a 3.9 GB ``.bin``).

    Raises:
        WeightsNotFoundError: ``path`` does not exist, or a required file is unavailable (offline).
    """
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise WeightsNotFoundError(f"{what}: weights path {str(p)!r} does not exist")
        return p if p.is_dir() else p.parent
    folder = None
    for f in required:
        folder = resolve_weight_file(WeightEntry(repo_id, f, revision), what=what).parent
    for f in optional:
        try:
            resolve_weight_file(WeightEntry(repo_id, f, revision), what=what)
        except WeightsNotFoundError:
            pass
    assert folder is not None
    return folder


@lru_cache(maxsize=1)
def offline_clip_tokenizer():
    """An HF ``CLIPTokenizer`` rebuilt from open_clip's bundled BPE (no download; ids match open_clip).

    Recipe (rewards.md §0): ``vocab.json`` = open_clip ``SimpleTokenizer().encoder`` with ``<start_of_text>`` /
    ``<end_of_text>`` renamed to ``<|startoftext|>`` / ``<|endoftext|>``; ``merges.txt`` = ``bpe_ranks`` sorted
    by rank under a ``#version: 0.2`` header. Written to a temporary folder, never committed.

    Raises:
        ImportError: open_clip is not installed (``pip install genalign[rewards]``).
    """
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    st = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in st.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])]
    d = tempfile.mkdtemp(prefix="genalign-clip-tok-")
    with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"))


def tiny_clip_config(projection_dim: int = 32):
    """Tiny ``CLIPConfig`` (rewards.md §1): 2-layer 32-wide towers, patch 14 at 224 px, ``logit_scale = ln 100``.

    ``projection_dim`` is set in both sub-configs too (``CLIPVisionModelWithProjection`` reads the vision one).
    """
    from transformers import CLIPConfig

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  hidden_act="gelu", projection_dim=projection_dim)
    return CLIPConfig(
        text_config=dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407, **common),
        vision_config=dict(image_size=224, patch_size=14, **common),
        projection_dim=projection_dim,
        logit_scale_init_value=math.log(100.0),
    )


class TextCache:
    """Prompt → embedding cache (computed once under ``no_grad``; text never needs gradients here)."""

    def __init__(self, maxsize: int = 4096):
        self.data: dict[str, torch.Tensor] = {}
        self.maxsize = maxsize

    def get(self, prompts: list[str], encode) -> torch.Tensor:
        missing = list(dict.fromkeys(p for p in prompts if p not in self.data))
        if missing:
            with torch.no_grad():
                emb = encode(missing)
            if len(self.data) + len(missing) > self.maxsize:
                self.data.clear()
            for p, e in zip(missing, emb):
                self.data[p] = e.detach()
        return torch.stack([self.data[p] for p in prompts])


def check_prompts(prompts, b: int) -> list[str]:
    """One prompt per sample: a list of ``b`` strings (a single string is repeated ``b`` times).

    Raises:
        ValueError: no prompts, or a list whose length is not ``b``.
    """
    if prompts is None:
        raise ValueError("this reward needs one prompt per sample (prompts=None given)")
    if isinstance(prompts, str):
        prompts = [prompts] * b
    prompts = list(prompts)
    if len(prompts) == 1 and b > 1:
        prompts = prompts * b
    if len(prompts) != b:
        raise ValueError(f"got {len(prompts)} prompts for {b} samples")
    return prompts


class HFCLIPReward(Reward):
    """Base of the transformers-``CLIPModel`` rewards (PickScore, CLIPScore): loading, caching, preprocessing.

    Args:
        weights: local folder (``save_pretrained`` layout) overriding the hub entry.
        tiny: tiny random CLIP (``tiny_clip_config``), no download; with ``weights`` the tiny folder is loaded.
        device: where to put the model.
        preprocess: ``"tensor"`` (differentiable torch resize-crop) or ``"reference"`` (PIL processor; no grad).
        model_id: hub id when no ``weights`` (defaults to the class's ``weights`` entry).

    Raises:
        WeightsNotFoundError: no local ``weights`` and the hub files are unavailable (e.g. ``HF_HUB_OFFLINE=1``).
    """

    modality = "image"
    kind = "instance"
    differentiable = True
    input_format = "images (B, 3, H, W) float in [0, 1] + B prompts"
    image_size = 224

    def __init__(self, weights: str | None = None, tiny: bool = False, device: str | torch.device | None = None,
                 preprocess: Preprocess = "tensor", model_id: str | None = None):
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        if preprocess not in ("tensor", "reference"):
            raise ValueError(f"preprocess must be 'tensor' or 'reference', got {preprocess!r}")
        self.preprocess_mode = preprocess
        what = f"reward {self.registry_name!r}"
        self.tokenizer = None
        if tiny and weights is None:
            torch.manual_seed(0)
            self.model = CLIPModel(tiny_clip_config())
        else:
            entry = self.weights if model_id is None else WeightEntry(model_id)
            assert entry is not None
            folder = resolve_hf_folder(
                entry.repo_id, ["config.json", "model.safetensors"],
                ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                 "preprocessor_config.json"],
                path=weights, revision=entry.revision, what=what)
            self.model = CLIPModel.from_pretrained(str(folder))
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
            except Exception:  # no tokenizer files next to the weights: the CLIP BPE is universal
                self.tokenizer = None
        if self.tokenizer is None:
            self.tokenizer = offline_clip_tokenizer()
        self.image_size = int(self.model.config.vision_config.image_size)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self._text_cache = TextCache()
        if device is not None:
            self.to(device)
        self.freeze()

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocess ``(B, 3, H, W)`` [0, 1] → normalised ``(B, 3, 224, 224)`` per ``preprocess``."""
        images = to_rgb(images)
        if self.preprocess_mode == "reference":
            return clip_reference_pixels(images, self.image_size)
        return normalize(clip_resize_crop(images, self.image_size), CLIP_MEAN, CLIP_STD)

    def embed(self, images: torch.Tensor, **_) -> torch.Tensor:
        """Unit-norm image embeddings ``(B, D)`` (differentiable in ``tensor`` mode)."""
        pix = self.pixels(images).to(device=self.device, dtype=self.model.logit_scale.dtype)
        return F.normalize(unwrap_features(self.model.get_image_features(pixel_values=pix)).float(), dim=-1)

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        return F.normalize(unwrap_features(self.model.get_text_features(**tok)).float(), dim=-1)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings ``(B, D)``, cached per prompt, no grad."""
        return self._text_cache.get(list(prompts), self._encode_text)

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``(B,)`` cosine similarity between each image and its prompt."""
        prompts = check_prompts(prompts, images.shape[0])
        return (self.embed(images) * self.encode_text(prompts).to(self.device)).sum(-1)


@REWARDS.register("pickscore-v1", "PickScore v1: exp(logit_scale)·cos on CLIP-H/14 (Pick-a-Pic)")
class PickScore(HFCLIPReward):
    """PickScore v1 logit ``s = exp(logit_scale) · ⟨î, t̂⟩`` (≈ 100·cos with the stored scale ⚠).

    Shapes: images ``(B, 3, H, W)`` in [0, 1], B prompts → ``(B,)`` float32 (typically ~18–24). Raw ``s``: any
    rescaling (Flow-GRPO's ``/26``) is a separate transform. Differentiable in ``tensor`` mode.

    Weights: hub ``yuvalkirstain/PickScore_v1`` (``config.json`` + ``model.safetensors``, ≈3.9 GB fp32); licence:
    code MIT, model card without a licence tag ⚠.

    Raises:
        WeightsNotFoundError: weights unavailable offline. ValueError: prompt count ≠ B.

    Source: Kirstain et al. 2023 (arXiv 2305.01569) §4; yuvalkirstain/PickScore README ``calc_probs``.
    """

    weights = WeightEntry("yuvalkirstain/PickScore_v1", None, licence="code MIT; weights: no tag on card (unverified)")

    def forward(self, samples: torch.Tensor, prompts: list[str] | None = None, **conditions) -> torch.Tensor:
        return self.model.logit_scale.exp().float() * self.cosine(samples, prompts)

    def probs(self, samples: torch.Tensor, prompts: list[str] | None = None,
              group_ids: torch.Tensor | list | None = None) -> torch.Tensor:
        """Group form: ``p_j = softmax_j(s_j)`` over the candidates of the same prompt (README ``calc_probs``).

        Args:
            group_ids: ``(B,)`` group of each sample; default = group by identical prompt string.

        Returns:
            ``(B,)`` probabilities summing to 1 within each group.
        """
        s = self.forward(samples, prompts)
        if group_ids is None:
            prompts = check_prompts(prompts, samples.shape[0])
            index = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
            group_ids = [index[p] for p in prompts]
        g = torch.as_tensor(group_ids, device=s.device)
        out = torch.empty_like(s)
        for gid in g.unique():
            m = g == gid
            out[m] = torch.softmax(s[m], dim=0)
        return out


def clipscore_hessel(cos: torch.Tensor, w: float = 2.5) -> torch.Tensor:
    """Hessel et al. 2021 CLIP-S per pair: ``w · max(cos, 0)`` (``(B,)`` → ``(B,)``; arXiv 2104.08718 §3)."""
    return w * cos.clamp_min(0)


def clipscore_torchmetrics(cos: torch.Tensor) -> torch.Tensor:
    """torchmetrics ``clip_score``: ``max(mean(100 · cos), 0)`` — the clamp is on the batch **mean**.

    ``(B,)`` → 0-dim. Source: Lightning-AI/torchmetrics ``functional/multimodal/clip_score.py`` (the docstring's
    per-sample clamp is not what the code does).
    """
    return (100.0 * cos).mean().clamp_min(0)


@REWARDS.register("clipscore", "CLIPScore: image–prompt cosine on a transformers CLIP (default ViT-L/14)")
class CLIPScore(HFCLIPReward):
    """CLIPScore as an instance reward.

    Args:
        definition: ``"cosine"`` (default, genalign **[recon]**: per-sample ``cos`` with **no clamp**, which would
            zero the gradient of poorly matched pairs) or ``"hessel"`` (``2.5·max(cos, 0)`` per pair, with the
            prompt prefixed by ``prefix``).
        prefix: caption prefix for ``"hessel"`` (paper: ``"A photo depicts "`` ⚠).
        model_id: any transformers CLIP (default ``openai/clip-vit-large-patch14``, as torchmetrics); the backbone
            is part of what "CLIP score" means, so report it.
        weights / tiny / device / preprocess: as :class:`HFCLIPReward`.

    Shapes: ``(B, 3, H, W)`` [0, 1] + B prompts → ``(B,)`` float32; cosine in [−1, 1], hessel in [0, 2.5].
    The torchmetrics-compatible batch number is :func:`clipscore_torchmetrics` (apply it to :meth:`cosine`).

    Raises:
        ValueError: unknown definition or prompt count ≠ B. WeightsNotFoundError: weights unavailable offline.

    Source: Hessel et al. 2021 (arXiv 2104.08718); torchmetrics ``clip_score``; rewards.md §4.
    """

    weights = WeightEntry("openai/clip-vit-large-patch14", None, licence="MIT (unverified for weights)")

    def __init__(self, weights: str | None = None, tiny: bool = False, device: str | torch.device | None = None,
                 preprocess: Preprocess = "tensor", model_id: str | None = None,
                 definition: Literal["cosine", "hessel"] = "cosine", prefix: str = "A photo depicts "):
        if definition not in ("cosine", "hessel"):
            raise ValueError(f"definition must be 'cosine' or 'hessel', got {definition!r}")
        super().__init__(weights=weights, tiny=tiny, device=device, preprocess=preprocess, model_id=model_id)
        self.definition = definition
        self.prefix = prefix

    def forward(self, samples: torch.Tensor, prompts: list[str] | None = None, **conditions) -> torch.Tensor:
        if self.definition == "hessel":
            prompts = [self.prefix + p for p in check_prompts(prompts, samples.shape[0])]
            return clipscore_hessel(self.cosine(samples, prompts))
        return self.cosine(samples, prompts)


# ----------------------------------------------------------------------------------------------------------------
# HPS (open_clip)

_TINY_HPS_NAME = "genalign-tiny-hps"
_TINY_HPS_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def _register_tiny_open_clip() -> str:
    import open_clip

    if _TINY_HPS_NAME not in open_clip.list_models():
        d = tempfile.mkdtemp(prefix="genalign-oc-")
        with open(os.path.join(d, f"{_TINY_HPS_NAME}.json"), "w") as f:
            json.dump(_TINY_HPS_CFG, f)
        open_clip.add_model_config(d)
    return _TINY_HPS_NAME


def hps_state_dict(obj: dict) -> dict[str, torch.Tensor]:
    """Extract the open_clip state dict from an HPS checkpoint (``{"state_dict": ...}``; DDP ``module.`` stripped)."""
    sd = obj.get("state_dict", obj)
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


class _HPS(Reward):
    modality = "image"
    kind = "instance"
    differentiable = True
    input_format = "images (B, 3, H, W) float in [0, 1] + B prompts"

    def __init__(self, weights: str | None = None, tiny: bool = False, device: str | torch.device | None = None,
                 preprocess: Preprocess = "tensor", grad_checkpointing: bool = False):
        super().__init__()
        try:
            import open_clip
        except ImportError as err:  # optional dependency
            raise ImportError("HPS needs open_clip: pip install 'genalign[rewards]'") from err
        if preprocess not in ("tensor", "reference"):
            raise ValueError(f"preprocess must be 'tensor' or 'reference', got {preprocess!r}")
        self.preprocess_mode = preprocess
        arch = _register_tiny_open_clip() if tiny else "ViT-H-14"
        if not tiny or weights is not None:
            assert self.weights is not None
            path = resolve_weight_file(self.weights, weights, what=f"reward {self.registry_name!r}")
        torch.manual_seed(0)
        self.model = open_clip.create_model(arch, pretrained=None)
        if not tiny or weights is not None:
            sd = hps_state_dict(load_state_dict(path))
            missing, unexpected = self.model.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise KeyError(f"HPS checkpoint {path}: missing keys {missing[:5]}..., unexpected {unexpected[:5]}...")
        self.model.float()
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.tokenizer = open_clip.get_tokenizer("ViT-H-14")  # bundled BPE: works offline
        self.image_size = 224
        self._text_cache = TextCache()
        if device is not None:
            self.to(device)
        self.freeze()

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Letterbox (longest side → 224, black pad) then CLIP-normalise; ``reference`` quantises to uint8 first."""
        images = to_rgb(images)
        if self.preprocess_mode == "reference":
            images = quantize_uint8(images)  # HPS reference reads 8-bit images (PIL → ToTensor)
        return normalize(letterbox(images, self.image_size, fill=0.0), CLIP_MEAN, CLIP_STD)

    def embed(self, images: torch.Tensor, **_) -> torch.Tensor:
        """Unit-norm image embeddings ``(B, D)``."""
        return F.normalize(self.model.encode_image(self.pixels(images).to(self.device)).float(), dim=-1)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings ``(B, D)``, cached, no grad."""
        def enc(ps):
            return F.normalize(self.model.encode_text(self.tokenizer(ps).to(self.device)).float(), dim=-1)

        return self._text_cache.get(list(prompts), enc)

    def forward(self, samples: torch.Tensor, prompts: list[str] | None = None, **conditions) -> torch.Tensor:
        prompts = check_prompts(prompts, samples.shape[0])
        return (self.embed(samples) * self.encode_text(prompts)).sum(-1)


@REWARDS.register("hps-v2.1", "HPSv2.1: plain cosine on fine-tuned open_clip ViT-H-14, letterbox preprocessing")
class HPSv21(_HPS):
    """HPSv2.1 score ``⟨î, t̂⟩`` (plain cosine, no logit scale; typical 0.25–0.35).

    Args:
        weights: local ``HPS_v2.1_compressed.pt`` (a ``{"state_dict": ...}`` dict, loaded with
            ``weights_only=True``) overriding hub ``xswu/HPSv2``. tiny: tiny open_clip config (random, or
            ``weights`` of that layout). preprocess: ``"tensor"`` (differentiable letterbox) or ``"reference"``
            (uint8 quantisation first). grad_checkpointing: open_clip ``set_grad_checkpointing``.

    Shapes: ``(B, 3, H, W)`` [0, 1] + B prompts → ``(B,)`` float32. Compare only images of the same prompt.

    Raises:
        ImportError: open_clip missing. WeightsNotFoundError: weights unavailable offline.
        KeyError: checkpoint keys do not match open_clip ViT-H-14.

    Source: Wu et al. 2023 (arXiv 2306.09341); tgxs002/HPSv2 ``hpsv2/img_score.py`` (letterbox eval transform,
    ``hpsv2/src/open_clip/transform.py`` ``ResizeMaxSize``); logit scale removed per HPSv2 #9.
    """

    weights = WeightEntry("xswu/HPSv2", "HPS_v2.1_compressed.pt", licence="apache-2.0")


@REWARDS.register("hps-v2.0", "HPSv2.0: plain cosine on fine-tuned open_clip ViT-H-14 (not comparable to v2.1)")
class HPSv20(_HPS):
    """HPSv2.0 score; identical to :class:`HPSv21` except the checkpoint (``HPS_v2_compressed.pt``).

    Source: Wu et al. 2023 (arXiv 2306.09341); tgxs002/HPSv2 ``hpsv2/utils.py`` (checkpoint names).
    """

    weights = WeightEntry("xswu/HPSv2", "HPS_v2_compressed.pt", licence="apache-2.0")


REWARDS.add("pickscore", PickScore, "alias of pickscore-v1")
REWARDS.add("hpsv2.1", HPSv21, "alias of hps-v2.1")

__all__ = [
    "CLIPScore",
    "HFCLIPReward",
    "HPSv20",
    "HPSv21",
    "PickScore",
    "clipscore_hessel",
    "clipscore_torchmetrics",
    "hps_state_dict",
    "offline_clip_tokenizer",
    "resolve_hf_folder",
    "tiny_clip_config",
]
