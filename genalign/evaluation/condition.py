"""Controllability metrics of conditional generation (ControlNet / ControlNet++ / Ctrl-U evaluation, ctrl_u.md §5).

- :func:`mean_iou`: dataset mIoU over classes (intersections and unions summed over the whole set, then the mean
  over classes with a non-empty union — mmseg's ``mean_iou``), ignore label 255.
- :func:`mask_iou`: foreground IoU of binary masks, per image (empty ∪ empty = 1).
- :func:`depth_rmse`: per-image RMSE of max-normalised depth on the 0–255 scale, averaged (the card's depth
  protocol: DPT-large predictions, max-normalised 8-bit).
- :func:`ssim`: single-scale SSIM (Wang et al. 2004, Gaussian window 11 / σ 1.5, K1 0.01, K2 0.03) for edge maps;
  the card's protocol is torchmetrics MS-SSIM, which needs images ≥ 160 px — single-scale is used here (and is
  what MS-SSIM reduces to at one scale).
- :func:`edge_f1`: pixel-level F1 of binarised edge maps (no distance tolerance).
- :func:`evaluate_condition_consistency`: run a condition reward on generated images and compute the metric of its
  task against their conditions; :func:`score_condition_dataset` does it for a folder (``genalign score``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from genalign.data.preference import decode_image
from genalign.rewards.condition import build_condition_reward


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> dict:
    """Dataset mIoU.

    Args:
        pred: ``(N, H, W)`` predicted labels (int). target: ``(N, H, W)`` true labels, ``ignore_index`` ignored.
        num_classes: K; labels outside ``[0, K)`` (other than the ignore label) raise.

    Returns:
        ``{"miou": float in [0, 1], "iou": list of K floats (nan for classes with an empty union),
        "pixel_accuracy": float}``.

    Raises:
        ValueError: shape mismatch or out-of-range labels.

    Source: mmseg ``mmseg/evaluation/metrics/iou_metric.py`` (``intersect_and_union`` summed over the set).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    valid = target != ignore_index
    p, t = pred[valid].long(), target[valid].long()
    if ((t < 0) | (t >= num_classes)).any() or ((p < 0) | (p >= num_classes)).any():
        raise ValueError(f"labels must be in [0, {num_classes}) or {ignore_index}")
    inter = torch.bincount(t[p == t], minlength=num_classes).double()
    area_p = torch.bincount(p, minlength=num_classes).double()
    area_t = torch.bincount(t, minlength=num_classes).double()
    union = area_p + area_t - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan")))
    miou = float(iou[union > 0].mean()) if (union > 0).any() else float("nan")
    acc = float(inter.sum() / max(1, t.numel()))
    return {"miou": miou, "iou": iou.tolist(), "pixel_accuracy": acc}


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image IoU of binary masks ``(N, H, W)`` (bool or {0, 1}) → ``(N,)`` in [0, 1]; both empty → 1."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    p, t = pred.bool().flatten(1), target.bool().flatten(1)
    inter = (p & t).sum(1).double()
    union = (p | t).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def depth_rmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image RMSE ``(N,)`` of depth maps ``(N, H, W)`` after dividing each by its max and scaling to 0–255
    (lower is better). The prediction is bilinearly resized to the target when sizes differ.

    Source: ControlNet++ ``eval/eval_depth.py`` protocol as summarised in ctrl_u.md §5 (max-normalised 8-bit)."""
    if pred.ndim != 3 or target.ndim != 3 or pred.shape[0] != target.shape[0]:
        raise ValueError(f"expected (N, H, W) depth maps, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.shape[-2:] != target.shape[-2:]:
        pred = F.interpolate(pred[:, None].float(), size=target.shape[-2:], mode="bilinear", align_corners=False)[:, 0]

    def norm(d):
        d = d.double().clamp_min(0)
        return 255.0 * d / d.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)

    return ((norm(pred) - norm(target)) ** 2).flatten(1).mean(1).sqrt()


def _gaussian_window(size: int, sigma: float, device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, window_size: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM ``(N,)`` of maps ``(N, C, H, W)`` (channels averaged) in [−1, 1], higher is better.

    ``window_size`` is clipped to the image size (odd), so 8x8 digits use a 7x7 window; valid convolution (no
    padding), as torchmetrics / scikit-image. Raises ValueError on shape mismatch.

    Source: Wang, Bovik, Sheikh, Simoncelli, IEEE TIP 2004, Eq. 13 (C1 = (0.01·L)², C2 = (0.03·L)²).
    """
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"expected two (N, C, H, W) maps of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    n, c, h, w = pred.shape
    k = min(window_size, h, w)
    k = k if k % 2 == 1 else k - 1
    win = _gaussian_window(k, sigma, pred.device).expand(c, 1, k, k)
    x, y = pred.double(), target.double()
    mu_x, mu_y = F.conv2d(x, win, groups=c), F.conv2d(y, win, groups=c)
    sxx = F.conv2d(x * x, win, groups=c) - mu_x ** 2
    syy = F.conv2d(y * y, win, groups=c) - mu_y ** 2
    sxy = F.conv2d(x * y, win, groups=c) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def edge_f1(pred: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per-image pixel F1 ``(N,)`` of edge maps ``(N, [1,] H, W)`` in [0, 1] binarised at ``threshold``;
    both empty → 1."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    p, t = (pred > threshold).flatten(1), (target > threshold).flatten(1)
    tp = (p & t).sum(1).double()
    denom = p.sum(1).double() + t.sum(1).double()
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.ones_like(denom))


METRICS = {"segmentation": "miou", "depth": "rmse", "hed": "ssim", "lineart": "ssim"}


@torch.no_grad()
def evaluate_condition_consistency(images: torch.Tensor, conditions: torch.Tensor, reward, metric: str | None = None,
                                   num_classes: int | None = None, real_images: torch.Tensor | None = None,
                                   batch_size: int = 64) -> dict:
    """Controllability of generated ``images`` w.r.t. their ``conditions`` under a condition reward's detector.

    Args:
        images: ``(N, 3, H, W)`` generated, in [0, 1]. conditions: ``(N, 3, H, W)`` in [0, 1].
        reward: a :class:`~genalign.rewards.condition.ConditionReward` (its task picks the default metric).
        metric: "miou" | "mask_iou" | "rmse" | "ssim" | "edge_f1"; None = the task's (card §5).
        num_classes: for "miou" (default: the reward's number of logits, i.e. its classes).
        real_images: for edge tasks, the target is the detector on the real images when given (card §4).

    Returns:
        ``{"metric": name, "value": float, "per_image": list[float] (not for miou), "consistency_loss": float}``
        (the latter = mean of the reward's per-image loss, the training-time quantity).
    """
    metric = metric or METRICS[reward.task]
    preds, targets, losses = [], [], []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].float()
        c = conditions[i:i + batch_size].float()
        real = real_images[i:i + batch_size].float() if real_images is not None else None
        tgt = reward.target_from_condition(c, real if reward.task in ("hed", "lineart") else None)
        pr = reward.predict(x)
        n_logits = pr.shape[1] if pr.ndim == 4 else None
        pr_a, tgt_a = reward.align(pr, tgt)
        losses.append(reward.consistency_loss(pr, tgt).cpu())
        preds.append((pr_a.argmax(1) if reward.task == "segmentation" else pr_a).cpu())
        targets.append(tgt_a.cpu())
    pred, target = torch.cat(preds), torch.cat(targets)
    out = {"metric": metric, "consistency_loss": float(torch.cat(losses).mean())}
    if metric == "miou":
        k = num_classes or n_logits
        res = mean_iou(pred, target, k, reward.ignore_index)
        out.update(value=res["miou"], per_class=res["iou"], pixel_accuracy=res["pixel_accuracy"])
        return out
    if metric == "mask_iou":
        vals = mask_iou(pred == 1, target == 1)
    elif metric == "rmse":
        vals = depth_rmse(pred, target)
    elif metric == "ssim":
        vals = ssim(pred, target)
    elif metric == "edge_f1":
        vals = edge_f1(pred, target)
    else:
        raise ValueError(f"unknown metric {metric!r}; expected miou, mask_iou, rmse, ssim or edge_f1")
    out.update(value=float(vals.mean()), per_image=vals.tolist())
    return out


def load_image(path: str | Path) -> torch.Tensor:
    """An image file as ``(3, H, W)`` float32 in [0, 1] (RGB, via :func:`genalign.data.preference.decode_image`).

    Raises:
        OSError / ValueError: unreadable file.
    """
    arr = np.asarray(decode_image(Path(path)), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def score_condition_dataset(folder: str | Path, reward: str = "digit_stroke_mask", metric: str | None = None,
                            reward_kwargs: dict | None = None, device=None) -> dict:
    """Controllability of a folder of generated images: ``metadata.jsonl`` rows with ``file_name`` (generated
    image) and ``condition`` (condition image), optional ``image`` (real image, for edge targets).

    Returns the dict of :func:`evaluate_condition_consistency` plus ``"n"`` and ``"files"``.

    Raises:
        FileNotFoundError: no ``metadata.jsonl``. ValueError: a row without ``condition``, or images of mixed sizes.
    """
    folder = Path(folder)
    meta = folder / "metadata.jsonl" if folder.is_dir() else folder
    if not meta.exists():
        raise FileNotFoundError(f"{meta}: needs metadata.jsonl rows with file_name and condition")
    rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    if any("condition" not in r for r in rows):
        raise ValueError(f"{meta}: every row needs a 'condition' image path")
    base = meta.parent
    imgs = torch.stack([load_image(base / r["file_name"]) for r in rows])
    conds = torch.stack([load_image(base / r["condition"]) for r in rows])
    real = torch.stack([load_image(base / r["image"]) for r in rows]) if all("image" in r for r in rows) else None
    rw = build_condition_reward(reward, reward_kwargs, device)
    out = evaluate_condition_consistency(imgs, conds, rw, metric, real_images=real)
    out.update(n=len(rows), files=[r["file_name"] for r in rows])
    if math.isnan(out["value"]):
        out["note"] = "no valid pixels"
    return out


__all__ = ["mean_iou", "mask_iou", "depth_rmse", "ssim", "edge_f1", "evaluate_condition_consistency",
           "score_condition_dataset", "METRICS"]
