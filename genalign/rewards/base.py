"""The reward interface and the weights policy shared by every reward.

A reward maps samples (and optionally prompts / conditions) to scores where **higher is better**:

- images: float RGB in [0, 1], shape ``(B, 3, H, W)``;
- audio: waveform ``(B, C, T)`` plus ``sample_rate`` (Hz);
- output: ``(B,)`` float32 for instance rewards, a 0-dim tensor for set rewards.

Architecture and weights are kept apart: a :class:`WeightEntry` names the file a reward needs (hub id or local
path, filename, sha256, licence), and :func:`resolve_weight_file` turns it into a local path with a clear error
when it cannot be found offline. Weights are read only with safetensors or ``torch.load(weights_only=True)``
(:func:`load_state_dict`).

Source: genalign design (``shared/methods/rewards.md`` §0, §11).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from genalign.errors import WeightsNotFoundError  # noqa: F401  (raised here; public via genalign.rewards)

Modality = Literal["image", "audio", "text", "video"]
Kind = Literal["instance", "group", "set"]


@dataclass(frozen=True)
class WeightEntry:
    """Where a reward's weights come from (kept apart from the architecture).

    Attributes:
        repo_id: Hugging Face hub id, e.g. ``"yuvalkirstain/PickScore_v1"``.
        filename: file inside the repo (``None`` = the whole snapshot, for ``from_pretrained`` folders).
        revision: git revision to pin, or ``None``.
        sha256: expected hex digest of ``filename``; checked after download when given.
        licence: licence string shown by ``genalign list rewards`` and copied into model cards.
    """

    repo_id: str
    filename: str | None = None
    revision: str | None = None
    sha256: str | None = None
    licence: str = "unknown"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_weight_file(entry: WeightEntry, path: str | os.PathLike | None = None, what: str = "reward") -> Path:
    """Return a local path for ``entry``: an explicit ``path``, else the hub cache / a download.

    Args:
        entry: the weights entry.
        path: explicit local file or folder; wins over the hub.
        what: name used in error messages (e.g. ``"reward 'pickscore'"``).

    Raises:
        WeightsNotFoundError: the file is neither at ``path`` nor downloadable (offline, no network); the message
            says which file is needed and how to supply it.
        ValueError: the sha256 of the file does not match ``entry.sha256``.
    """
    if path is not None:
        p = Path(path)
        if p.is_dir() and entry.filename and (p / entry.filename).exists():
            p = p / entry.filename
        if not p.exists():
            raise WeightsNotFoundError(f"{what}: weights path {str(p)!r} does not exist")
    else:
        from huggingface_hub import hf_hub_download, snapshot_download

        try:
            if entry.filename is None:
                p = Path(snapshot_download(entry.repo_id, revision=entry.revision))
            else:
                p = Path(hf_hub_download(entry.repo_id, entry.filename, revision=entry.revision))
        except Exception as err:  # offline, missing repo, no network: one clear message
            target = f"{entry.repo_id}/{entry.filename}" if entry.filename else entry.repo_id
            raise WeightsNotFoundError(
                f"{what}: cannot get weights {target!r} ({type(err).__name__}). Provide them with "
                f"`weights: /local/path` (download https://huggingface.co/{entry.repo_id} on a machine with "
                f"network), or unset HF_HUB_OFFLINE and allow network access."
            ) from None
    if entry.sha256 and p.is_file():
        digest = sha256_file(p)
        if digest != entry.sha256:
            raise ValueError(f"{what}: sha256 mismatch for {p}: expected {entry.sha256}, got {digest}")
    return p


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict safely: safetensors, or ``torch.load(weights_only=True)`` for .pt/.pth/.bin.

    Raises:
        WeightsNotFoundError: missing file.
        pickle.UnpicklingError: the pickle holds non-tensor objects (refused by ``weights_only``).
    """
    path = Path(path)
    if not path.exists():
        raise WeightsNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


class Reward(nn.Module):
    """Base class of every reward: ``forward(samples, prompts=None, **conditions) -> Tensor``.

    Subclasses set the class attributes below and implement :meth:`forward`. A reward module is frozen
    (``requires_grad_(False)``) and always in eval mode, but never wraps ``forward`` in ``no_grad``: when
    ``differentiable`` is True, gradients flow from the score back to the input samples. Use :meth:`score` for
    evaluation (``no_grad``).

    Class attributes:
        modality: "image" | "audio" | "text" | "video".
        kind: "instance" (``(B,)`` scores), "group" (relative within a prompt group) or "set" (scalar).
        differentiable: whether ``forward`` is differentiable w.r.t. the samples.
        input_format: short description of the expected input, shown by ``genalign list``.
        weights: default :class:`WeightEntry` or ``None`` (weight-free, or weights resolved another way).
        weight_free: computed from the samples alone (no network to load): ``genalign plan`` counts nothing for it.
    """

    modality: ClassVar[Modality] = "image"
    kind: ClassVar[Kind] = "instance"
    differentiable: ClassVar[bool] = False
    input_format: ClassVar[str] = "images (B, 3, H, W) float in [0, 1]"
    weights: ClassVar[WeightEntry | None] = None
    weight_free: ClassVar[bool] = False
    registry_name: ClassVar[str] = "reward"

    def freeze(self) -> "Reward":
        """Freeze all parameters and switch to eval mode (call at the end of ``__init__``)."""
        self.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode: bool = True) -> "Reward":  # noqa: D102 - rewards stay in eval mode (dropout heads)
        return super().train(False)

    @torch.no_grad()
    def score(self, samples: torch.Tensor, prompts: list[str] | None = None, **conditions) -> torch.Tensor:
        """Evaluation scores without autograd; same shapes as :meth:`forward`."""
        return self.forward(samples, prompts, **conditions).float()
