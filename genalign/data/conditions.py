"""(image, condition, caption) rows for ControlNet training (ControlNet++ / Ctrl-U, ctrl_u.md §4).

- :func:`load_condition_rows` reads real images and prompts from an ``images`` data source and the condition of
  each row: read from the dataset (ADE20K ``control_seg``, MultiGen depth) or derived by the condition reward's
  detector from the real image (HED / lineart: card §4; the digits demo's stroke masks);
- :class:`ConditionData` turns them into model inputs once: cached VAE latents, text conditioning, condition
  images and the reward target of each condition (``reward.target_from_condition``);
- :func:`conditions_for_prompts` picks a held-out condition per validation prompt.

Source: Ctrl-U ``grenoble-zhang/Ctrl-U@704d51d`` / ControlNet++ ``train/*.py`` data pipelines (condition column,
detector-made conditions); genalign's own caching.
"""

from __future__ import annotations

from typing import Any

import torch

from genalign.data.digits import digit_of_prompt
from genalign.data.images import load_image_data

__all__ = ["ConditionData", "load_condition_rows", "conditions_for_prompts"]


def load_condition_rows(source: str, resolution: int, reward, condition: str = "derive",
                        condition_column: str | None = None, image_column: str = "image",
                        caption_column: str = "prompt", max_images: int | None = None, seed: int = 0):
    """Real images, prompts and condition images ``(N, 3, H, W)`` in [0, 1] from an ``images`` data source.

    Args:
        source: ``digits:train`` / ``digits:test``, a folder with ``metadata.jsonl`` (``file_name``, ``prompt``,
            ``condition``), a parquet folder or a `datasets` id (see :func:`genalign.data.images.load_image_data`).
        resolution: image side in pixels (images and conditions are resized to it).
        reward: the condition reward (its detector makes conditions when ``condition="derive"``).
        condition: "derive" (condition = ``reward.condition_from_image(real image)``, card §4 HED/lineart and the
            digits demo) or "dataset" (read ``condition_column``).
        condition_column, image_column, caption_column, max_images, seed: passed to ``load_image_data``.

    Returns:
        ``(images, prompts, conditions, labels_or_None, skipped)``: images and conditions ``(N, 3, H, W)`` in
        [0, 1]; labels (digits only) ``(N,)``; skipped: rows dropped while loading, counted by reason.

    Raises:
        ValueError: ``condition="dataset"`` without condition images in the data (names ``data.source``).
    """
    data = load_image_data(source, resolution, image_column=image_column, caption_column=caption_column,
                           condition_column=condition_column if condition == "dataset" else None,
                           max_images=max_images, seed=seed)
    if condition == "dataset":
        if data.conditions is None:
            raise ValueError(f"data.source {source!r}: objective.condition 'dataset' needs condition images "
                             "(data.source.condition_column); use condition: derive to make them with the reward")
        conds = data.conditions
    else:
        p = next(iter(reward.parameters()), None)
        dev = p.device if p is not None else torch.device("cpu")
        conds = torch.cat([reward.condition_from_image(data.images[i:i + 64].to(dev)).cpu()
                           for i in range(0, len(data), 64)])
    return data.images, data.prompts, conds, data.labels, data.skipped


class ConditionData:
    """(image, condition, caption) rows as model inputs: cached latents, text conditioning, condition images and
    the reward target of each condition.

    Args:
        model: the ControlNet adapter (``encode``, ``encode_prompt``, ``device``).
        images: ``(N, 3, H, W)`` real images in [0, 1]. prompts: N captions. conditions: ``(N, 3, H, W)`` in [0, 1].
        reward: the condition reward (``target_from_condition``; edge tasks use the detector on the real image).
        labels: optional ``(N,)`` digit labels. skipped: counts of rows dropped while loading.
        seed: seed of the VAE posterior sample (drawn once; the official code re-samples every step — [recon]).
        chunk: rows encoded per forward.

    Attributes:
        n: rows. latents: ``(N, 4, h, w)`` scaled VAE posterior samples. conditions: ``(N, 3, H, W)`` in [0, 1].
        targets: reward target per row: labels ``(N, H, W)`` int64, depth ``(N, H, W)``, edges ``(N, 1, H, W)``.
        cond: text conditioning dict of ``(N, ...)`` tensors. prompts, labels, skipped.
    """

    def __init__(self, model, images: torch.Tensor, prompts: list[str], conditions: torch.Tensor, reward,
                 labels: torch.Tensor | None = None, skipped: dict | None = None, seed: int = 0, chunk: int = 64):
        self.model, self.prompts, self.labels = model, list(prompts), labels
        self.skipped = dict(skipped or {})
        self.n = len(self.prompts)
        self.conditions = conditions.float().cpu()
        g = torch.Generator().manual_seed(seed)
        lat, conds, tg = [], [], []
        with torch.no_grad():
            for i in range(0, self.n, chunk):
                x = images[i:i + chunk].to(model.device)
                lat.append(model.encode(x, generator=g).cpu())
                conds.append({k: v.cpu() for k, v in model.encode_prompt(self.prompts[i:i + chunk]).items()})
                c = self.conditions[i:i + chunk].to(model.device)
                real = x if reward.task in ("hed", "lineart") else None  # edges: detector on the real image (§4)
                tg.append(reward.target_from_condition(c, real).cpu())
        self.latents = torch.cat(lat)
        self.cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
        self.targets = torch.cat(tg)

    def batch(self, idx: torch.Tensor) -> dict[str, Any]:
        """``{"latents": (B, 4, h, w), "cond": {..., "controlnet_cond": (B, 3, H, W)}, "target", "ids"}``."""
        dev = self.model.device
        cond = {k: v[idx].to(dev) for k, v in self.cond.items()}
        cond["controlnet_cond"] = self.conditions[idx].to(dev)
        return {"latents": self.latents[idx].to(dev), "cond": cond, "target": self.targets[idx].to(dev),
                "ids": idx.tolist()}


def conditions_for_prompts(conditions: torch.Tensor, labels: torch.Tensor | None, prompts: list[str]) -> torch.Tensor:
    """One held-out condition ``(N, 3, H, W)`` per prompt: for a digit prompt (labels given), the i-th condition
    of the prompted digit; otherwise rows in order (cyclic).

    Args:
        conditions: ``(M, 3, H, W)`` held-out conditions. labels: optional ``(M,)`` digit labels. prompts: N prompts.
    """
    out = []
    for i, p in enumerate(prompts):
        j = i % len(conditions)
        if labels is not None:
            try:
                rows = (labels == digit_of_prompt(p)).nonzero()[:, 0]
                j = int(rows[i % len(rows)])
            except ValueError:
                pass
        out.append(conditions[j])
    return torch.stack(out)
