"""``digit_classifier``: the prompt-fidelity reward of the digits demo (analogue of CLIPScore / ImageReward).

reward(image, prompt) = p(prompted digit | image) ∈ [0, 1] under a small CNN trained on the real digits
(:mod:`genalign.data.digits`); its held-out accuracy is recorded in ``assets/digits_classifier.json``. The
penultimate 128-d features also serve the Frechet distance to real digits (a fidelity check that an objective did
not collapse the distribution). Differentiable w.r.t. the pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genalign.registry import rewards as REWARDS
from genalign.rewards.base import Reward, WeightsNotFoundError, load_state_dict

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CLASSIFIER_FILE = ASSETS / "digits_classifier.safetensors"


class DigitCNN(nn.Module):
    """4-layer CNN on 8x8 grey digits: ``(B, 1, 8, 8)`` in [0, 1] → logits ``(B, 10)``; ``features`` → ``(B, 128)``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_grey8(images: torch.Tensor) -> torch.Tensor:
    """RGB ``(B, 3, H, W)`` in [0, 1] → grey ``(B, 1, 8, 8)`` (channel mean, area/bilinear resize if needed)."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    grey = images.float().mean(dim=1, keepdim=True)
    if grey.shape[-2:] != (8, 8):
        grey = F.interpolate(grey, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    return grey


def train_digit_classifier(seed: int = 0, epochs: int = 40) -> tuple[DigitCNN, float]:
    """Train :class:`DigitCNN` on the train split (noise + shift augmentation); return (model, test accuracy)."""
    from genalign.data.digits import load_digits_split

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = load_digits_split("train")
    xt, yt = load_digits_split("test")
    model = DigitCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            xb = to_grey8(x[perm[i:i + 64]])
            # Generated samples are noisier than scans: train on noisy, slightly shifted digits.
            xb = (xb + 0.1 * torch.randn(xb.shape, generator=g)).clamp(0, 1)
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[perm[i:i + 64]])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(to_grey8(xt)).argmax(-1) == yt).float().mean().item()
    return model, acc


@REWARDS.register("digit_classifier", "p(prompted digit | image) under a CNN trained on real digits (demo)")
class DigitClassifierReward(Reward):
    """Probability of the prompted digit, from a CNN trained on scikit-learn's real digits.

    Input: images ``(B, 3, H, W)`` float in [0, 1] (resized to 8x8 grey) and prompts naming a digit
    ("a handwritten digit 7", "a handwritten seven"). Output: ``(B,)`` in [0, 1]. Differentiable.

    Args:
        weights: path to a safetensors state dict; default: the one shipped in ``genalign/assets``.
        device: where to put the network.

    Raises:
        WeightsNotFoundError: the weights file is missing (rebuild with ``python scripts/build_digits.py``).
        ValueError: a prompt names no digit, or prompts are missing.
    """

    modality = "image"
    kind = "instance"
    differentiable = True
    input_format = "images (B, 3, H, W) float in [0, 1] + prompts naming a digit"

    def __init__(self, weights: str | None = None, device: str | torch.device | None = None):
        super().__init__()
        path = Path(weights) if weights else CLASSIFIER_FILE
        if not path.exists():
            raise WeightsNotFoundError(
                f"digit_classifier weights {str(path)!r} not found; rebuild them with `python scripts/build_digits.py`"
            )
        self.net = DigitCNN()
        self.net.load_state_dict(load_state_dict(path))
        if device is not None:
            self.to(device)
        self.freeze()

    def forward(self, samples: torch.Tensor, prompts: list[str] | None = None, **conditions) -> torch.Tensor:
        from genalign.data.digits import digit_of_prompt

        if prompts is None or len(prompts) != samples.shape[0]:
            raise ValueError("digit_classifier needs one prompt per image (the prompted digit is the label)")
        labels = torch.tensor([digit_of_prompt(p) for p in prompts], device=samples.device)
        probs = self.net(to_grey8(samples)).softmax(-1)
        return probs.gather(1, labels[:, None]).squeeze(1).float()

    def features(self, samples: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, 128)`` for Frechet distances to the real digits."""
        return self.net.features(to_grey8(samples))


def classifier_report() -> dict:
    """The build report of the shipped classifier (held-out accuracy, seed), or {} if absent."""
    p = ASSETS / "digits_classifier.json"
    return json.loads(p.read_text()) if p.exists() else {}


@torch.no_grad()
def digits_frechet_distance(images: torch.Tensor, reference: str = "test", classifier: "DigitClassifierReward | None" = None) -> float:
    """Frechet distance between generated images and the real digits, on the digit classifier's 128-d features.

    The "FID of the digits demo": a fidelity check that an objective raised its reward without collapsing the
    distribution. Args: ``images`` ``(N, 3, H, W)`` in [0, 1] (N ≥ 2; a few hundred for a stable figure);
    ``reference``: real split ("test" = held out, 360 images; "train"). Returns a float ≥ 0 (lower is closer).
    Source: Heusel et al. 2017 (FID) with this classifier's features instead of Inception's;
    :func:`genalign.rewards.fad.frechet_distance`.
    """
    from genalign.data.digits import load_digits_split
    from genalign.rewards.fad import frechet_distance, gaussian_stats

    clf = classifier or DigitClassifierReward()
    real, _ = load_digits_split(reference)
    mu_r, cov_r = gaussian_stats(clf.features(real).double())
    mu_g, cov_g = gaussian_stats(clf.features(images.to(next(clf.parameters()).device)).double().cpu())
    return float(frechet_distance(mu_g, cov_g, mu_r, cov_r))
