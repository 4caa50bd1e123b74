"""Shared tiny reward models (built once per session; random weights, no network)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pickscore():
    from genalign.rewards.clip import PickScore

    return PickScore(tiny=True)


@pytest.fixture(scope="session")
def tiny_hps():
    pytest.importorskip("open_clip")
    from genalign.rewards.clip import HPSv21

    return HPSv21(tiny=True)


@pytest.fixture()
def offline(monkeypatch):
    """Force huggingface_hub offline even if the env var was read before import."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True, raising=False)
    cache = os.environ.get("HF_HOME")
    return cache


def make_images(b: int = 2, h: int = 240, w: int = 200, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth-ish images: low-res noise upsampled, so different images are clearly different
    low = torch.rand(b, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)


@pytest.fixture(scope="session")
def images():
    """Factory ``images(b, h, w, seed)`` of smooth random RGB images in [0, 1]."""
    return make_images
