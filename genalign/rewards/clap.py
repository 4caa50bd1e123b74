"""CLAP text–audio score on ``transformers.ClapModel`` with a differentiable torch front end.

``r = cos(â, t̂)`` between the projected CLAP audio embedding of the clip and the text embedding of its prompt
(no ×100, no clamp), as frechet-audio-distance's ``CLAPScore`` and DRAGON's instance reward.

Front end (pure torch, so gradients reach the waveform): mono (channel mean) → resample to 48 kHz
(:func:`~genalign.rewards.preprocess.resample`) → 10 s windows (short clips: ``repeatpad``; long clips:
deterministic ``long_mode``, never HF's random crop) → :class:`~genalign.rewards.preprocess.LogMel` (n_fft 1024,
hop 480, 64 mels, ``f_min``/``f_max`` from the checkpoint's ``preprocessor_config.json``) → ``(B, 1, 1001, 64)``.

Source: Wu et al. 2023, "Large-scale Contrastive Language-Audio Pretraining" (arXiv 2211.06687);
``transformers`` ``ClapModel`` / ``ClapFeatureExtractor``; rewards.md §6. Only non-fusion checkpoints are
supported (``larger_clap_music`` is HTSAT-base without fusion).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from genalign.registry import rewards as REWARDS
from genalign.rewards.base import Reward, WeightEntry, WeightsNotFoundError, resolve_weight_file
from genalign.rewards.clip import check_prompts, TextCache
from genalign.rewards.preprocess import LogMel, repeatpad, resample, unwrap_features

logger = logging.getLogger(__name__)


def tiny_clap_config():
    """Tiny ``ClapConfig`` (rewards.md §6): 32-wide RoBERTa, 2-stage HTS-AT (16→32), 64 mels, projection 32."""
    from transformers import ClapConfig

    return ClapConfig(
        text_config=dict(vocab_size=50265, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, projection_dim=32),
        audio_config=dict(patch_embeds_hidden_size=16, hidden_size=32, depths=[1, 1], num_attention_heads=[2, 2],
                          window_size=8, spec_size=256, num_mel_bins=64, projection_dim=32, enable_fusion=False),
        projection_dim=32,
    )


class _ByteTokenizer:
    """Offline RoBERTa-like byte tokeniser for tiny builds: ``<s>``=0, pad=1, ``</s>``=2, byte b → b+3."""

    def __call__(self, prompts, padding=True, truncation=True, max_length=77, return_tensors="pt"):
        rows = [[0] + [b + 3 for b in p.encode("utf-8")][: max_length - 2] + [2] for p in prompts]
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), 1, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


@REWARDS.register("clap", "CLAP text–audio cosine (transformers ClapModel, default laion/larger_clap_music)")
class CLAPScore(Reward):
    """CLAP score ``cos(â, t̂)`` per clip.

    Args:
        weights: local ``from_pretrained`` folder (``config.json`` + ``model.safetensors``/``pytorch_model.bin``,
            tokenizer files, ``preprocessor_config.json``) overriding hub ``model_id``.
        model_id: hub id (default ``laion/larger_clap_music``, card tag apache-2.0).
        tiny: :func:`tiny_clap_config` with random weights and a byte tokeniser (tests).
        sample_rate: default input rate (Hz); a ``sample_rate=`` condition overrides it per call.
        long_mode: clips longer than 10 s: ``"mean"`` (mean of unit embeddings over consecutive full 10 s windows,
            then renormalised), ``"first"`` (first 10 s) or ``"center"`` (middle 10 s). Deterministic, unlike
            HF's ``rand_trunc``. **[recon]**.
        f_min, f_max: mel band edges; default from the checkpoint's ``preprocessor_config.json``, else 50 / 14000
            Hz (the class default ``f_min=0`` differs from the hub files, rewards.md §6).
        device, preprocess: only ``"tensor"`` exists (the torch front end equals the extractor to ~1e-4 dB).

    Shapes: samples ``(B, C, T)`` or ``(B, T)`` float waveform at ``sample_rate`` + B prompts → ``(B,)`` float32
    in [−1, 1]. Differentiable w.r.t. the waveform.

    Raises:
        WeightsNotFoundError: weights unavailable offline. ValueError: bad shapes / prompt count.
        NotImplementedError: a fusion checkpoint.

    Source: arXiv 2211.06687; frechet-audio-distance ``clap_score.py``; DRAGON (arXiv 2504.15217).
    """

    modality = "audio"
    kind = "instance"
    differentiable = True
    input_format = "waveform (B, C, T) or (B, T) float + sample_rate (Hz) + B prompts"
    weights = WeightEntry("laion/larger_clap_music", None, licence="apache-2.0")
    target_rate = 48_000
    window_s = 10

    def __init__(self, weights: str | None = None, tiny: bool = False, device: str | torch.device | None = None,
                 preprocess: str = "tensor", model_id: str | None = None, sample_rate: int = 48_000,
                 long_mode: Literal["mean", "first", "center"] = "mean", f_min: float | None = None,
                 f_max: float | None = None):
        super().__init__()
        from transformers import AutoTokenizer, ClapModel

        if preprocess != "tensor":
            raise ValueError("CLAP supports preprocess='tensor' only (torch log-mel, parity-tested with the extractor)")
        if long_mode not in ("mean", "first", "center"):
            raise ValueError(f"long_mode must be 'mean', 'first' or 'center', got {long_mode!r}")
        what = f"reward {self.registry_name!r}"
        fe: dict = {}
        if tiny and weights is None:
            torch.manual_seed(0)
            self.model = ClapModel(tiny_clap_config())
            self.tokenizer = _ByteTokenizer()
        else:
            folder = self._resolve(weights, model_id, what)
            self.model = ClapModel.from_pretrained(str(folder))
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
            except Exception:
                if not tiny:
                    raise
                self.tokenizer = _ByteTokenizer()
            pp = Path(folder) / "preprocessor_config.json"
            if pp.exists():
                fe = json.loads(pp.read_text())
            else:
                logger.warning("%s: no preprocessor_config.json; using f_min=50, f_max=14000 Hz", what)
        if getattr(self.model.config.audio_config, "enable_fusion", False):
            raise NotImplementedError("fusion CLAP checkpoints are not supported (use a non-fusion one)")
        trunc = fe.get("truncation", "rand_trunc")
        self.frontend = LogMel(
            sample_rate=int(fe.get("sampling_rate", 48_000)), n_fft=int(fe.get("fft_window_size", 1024)),
            hop_length=int(fe.get("hop_length", 480)), n_mels=int(fe.get("feature_size", 64)),
            f_min=float(f_min if f_min is not None else fe.get("frequency_min", 50.0)),
            f_max=float(f_max if f_max is not None else fe.get("frequency_max", 14_000.0)),
            # the extractor uses slaney filters for rand_trunc, htk without norm for fusion
            mel_scale="htk" if trunc == "fusion" else "slaney", norm=None if trunc == "fusion" else "slaney",
        )
        self.target_rate = self.frontend.sample_rate
        self.sample_rate = int(sample_rate)
        self.long_mode = long_mode
        self.max_samples = self.window_s * self.target_rate
        self._text_cache = TextCache()
        if device is not None:
            self.to(device)
        self.freeze()

    def _resolve(self, weights, model_id, what) -> Path:
        if weights is not None:
            p = Path(weights)
            if not p.exists():
                raise WeightsNotFoundError(f"{what}: weights path {str(p)!r} does not exist")
            return p if p.is_dir() else p.parent
        repo = model_id or self.weights.repo_id  # type: ignore[union-attr]
        folder = resolve_weight_file(WeightEntry(repo, "config.json"), what=what).parent
        try:
            resolve_weight_file(WeightEntry(repo, "model.safetensors"), what=what)
        except WeightsNotFoundError:
            resolve_weight_file(WeightEntry(repo, "pytorch_model.bin"), what=what)
        for f in ("preprocessor_config.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                  "special_tokens_map.json", "tokenizer.json"):
            try:
                resolve_weight_file(WeightEntry(repo, f), what=what)
            except WeightsNotFoundError:
                pass
        return folder

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale_a.device

    def windows(self, samples: torch.Tensor, sample_rate: int | None = None) -> tuple[torch.Tensor, int]:
        """Mono 48 kHz 10 s windows ``(B·W, 480000)`` and W (windows per clip)."""
        x = samples
        if x.ndim == 3:
            x = x.mean(1)  # mono: average the channels
        if x.ndim != 2:
            raise ValueError(f"expected waveform (B, C, T) or (B, T), got {tuple(samples.shape)}")
        x = resample(x.float(), sample_rate or self.sample_rate, self.target_rate)
        n, t = x.shape[-1], self.max_samples
        if n <= t:
            return repeatpad(x, t), 1
        if self.long_mode == "first":
            return x[:, :t], 1
        if self.long_mode == "center":
            s = (n - t) // 2
            return x[:, s:s + t], 1
        w = n // t  # full windows only; the tail shorter than 10 s is ignored
        return x[:, : w * t].reshape(-1, t), w

    def embed(self, samples: torch.Tensor, sample_rate: int | None = None, **_) -> torch.Tensor:
        """Unit-norm audio embeddings ``(B, D)`` (differentiable)."""
        b = samples.shape[0]
        win, w = self.windows(samples.to(self.device), sample_rate)
        mel = self.frontend(win)  # (B·W, 1, frames, mels)
        emb = F.normalize(unwrap_features(self.model.get_audio_features(input_features=mel)).float(), dim=-1)
        if w > 1:
            emb = F.normalize(emb.reshape(b, w, -1).mean(1), dim=-1)
        return emb

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings ``(B, D)``, cached, no grad."""
        def enc(ps):
            tok = self.tokenizer(ps, padding=True, truncation=True, max_length=77, return_tensors="pt")
            tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
            return F.normalize(unwrap_features(self.model.get_text_features(**tok)).float(), dim=-1)

        return self._text_cache.get(list(prompts), enc)

    def forward(self, samples: torch.Tensor, prompts: list[str] | None = None, **conditions) -> torch.Tensor:
        prompts = check_prompts(prompts, samples.shape[0])
        emb = self.embed(samples, conditions.get("sample_rate"))
        return (emb * self.encode_text(prompts)).sum(-1)


__all__ = ["CLAPScore", "tiny_clap_config"]
