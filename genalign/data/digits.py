"""The real data behind the digits demo: scikit-learn's bundled 8x8 handwritten digits (1,797 images).

Source: the UCI "Optical Recognition of Handwritten Digits" data set as shipped in scikit-learn
(``sklearn.datasets.load_digits``); nothing is downloaded. Images are returned as RGB floats in [0, 1]
(the grey level replicated over 3 channels) so they follow the image-reward contract of every other reward.

Prompts come in two disjoint template families: training templates (used by on-policy pair generation and
prompt-only objectives) and held-out templates (used only for evaluation), so "held-out prompts are never
trained on" holds for the demo too. The base model is pretrained on all templates.
"""

from __future__ import annotations

import numpy as np
import torch

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_TEMPLATES = ("a handwritten digit {d}", "the number {d}, written by hand")
HELDOUT_TEMPLATES = ("a handwritten {w}", "a drawing of the digit {d}")


def digit_prompt(template: str, digit: int) -> str:
    """Fill a template with ``{d}`` (the numeral) and ``{w}`` (the word)."""
    return template.format(d=digit, w=DIGIT_WORDS[digit])


def digits_prompts(split: str = "train") -> list[str]:
    """The 20 prompts of ``split`` ("train" | "heldout"), digit-major order.

    Raises:
        ValueError: unknown split.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"digits prompt split must be 'train' or 'heldout', got {split!r}")
    templates = TRAIN_TEMPLATES if split == "train" else HELDOUT_TEMPLATES
    return [digit_prompt(t, d) for d in range(10) for t in templates]


def digit_of_prompt(prompt: str) -> int:
    """Which digit a digits-demo prompt asks for (numeral or word).

    Raises:
        ValueError: the prompt names no digit.
    """
    for tok in prompt.lower().replace(",", " ").split():
        if tok.isdigit() and len(tok) == 1:
            return int(tok)
        if tok in DIGIT_WORDS:
            return DIGIT_WORDS.index(tok)
    raise ValueError(f"prompt {prompt!r} names no digit (expected a numeral 0-9 or a word zero..nine)")


def load_digits_split(split: str = "train", test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Real digit images and labels of a fixed stratified split.

    Args:
        split: "train" | "test" | "all".
        test_fraction: fraction of each class held out (fixed by ``seed``).

    Returns:
        images ``(N, 3, 8, 8)`` float32 in [0, 1]; labels ``(N,)`` int64 in 0..9.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    x = torch.from_numpy((ds.images / 16.0).astype(np.float32)).unsqueeze(1).repeat(1, 3, 1, 1)
    y = torch.from_numpy(ds.target.astype(np.int64))
    if split == "all":
        return x, y
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed,
                                           stratify=ds.target)
    idx = idx_train if split == "train" else idx_test
    if split not in ("train", "test"):
        raise ValueError(f"digits split must be 'train', 'test' or 'all', got {split!r}")
    return x[idx], y[idx]
