"""Held-out validation: sample each held-out prompt with fixed seeds, score every sample, keep the samples.

Sample i of the expanded prompt list (each prompt repeated ``samples_per_prompt`` times) always uses seed
``validation.seed + i`` — independent of batch size and of the number of ranks — so the base model's and the
trained model's samples of one prompt share their noise. Work is sharded over ranks and the per-reward sums are
reduced, so every rank takes part.

With ``save_dir`` the samples are kept as the report reads them: ``save_dir/sample_00000.png`` (or ``.wav``)
and one ``metadata.rank<r>.jsonl`` per rank with ``file_name``, ``index``, ``prompt``, ``seed`` and the sample's
value of every reward; :func:`read_saved_samples` merges the ranks. The report never draws again what evaluation
drew (issue "What a user sees").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch


def save_sample(path_stem: Path, sample: torch.Tensor, sample_rate: int | None = None) -> str:
    """Write one sample: an image ``(3, H, W)`` in [0, 1] as PNG, or a waveform ``(C, T)`` / ``(T,)`` as WAV.

    Returns:
        the file name written (``<stem>.png`` or ``<stem>.wav``).

    Raises:
        ValueError: a waveform without ``sample_rate``, or a tensor of another rank.
    """
    if sample.ndim == 3 and sample.shape[0] in (1, 3, 4) and sample_rate is None:
        from torchvision.utils import save_image

        path = path_stem.with_suffix(".png")
        save_image(sample.detach().float().cpu().clamp(0, 1), str(path))
        return path.name
    if sample.ndim in (1, 2):
        if sample_rate is None:
            raise ValueError("saving a waveform needs the model's sample_rate")
        from genalign.data.audio import save_audio

        return save_audio(path_stem.with_suffix(".wav"), sample, sample_rate).name
    raise ValueError(f"cannot save a sample of shape {tuple(sample.shape)} (image (3, H, W) or waveform (C, T))")


@torch.no_grad()
def evaluate_rewards(objective, rewards, prompts: list[str], vcfg, accelerator=None, save_dir: str | Path | None = None,
                     on_batch: Callable[[int], None] | None = None,
                     set_rewards: dict[str, Any] | None = None) -> dict[str, float]:
    """Mean reward per name over ``vcfg.samples_per_prompt`` samples of each held-out prompt.

    Args:
        objective: the run's objective (its :meth:`~genalign.objectives.base.Objective.sample` draws the samples).
        rewards: a :class:`~genalign.rewards.composite.CompositeReward` (``names``, ``components``).
        prompts: held-out prompts. vcfg: :class:`genalign.config.ValidationConfig` (seed, batch size, sampler).
        accelerator: shards the samples over ranks and reduces the sums; None = one process.
        save_dir: keep every sample and its rewards there (see the module docstring).
        on_batch: called with the number of samples this rank finished in each batch (progress bars).
        set_rewards: ``{name: set reward}`` (``embed(samples) -> (B, D)``, ``score_embeddings((N, D)) -> ()``,
            e.g. ``fad-dataset``): each batch is embedded, the embeddings of every rank are gathered and the
            reward is scored once over all the samples (not averaged over batches, which would change an FD).

    Returns:
        ``{reward name: mean over every sample}`` plus ``{set reward name: its value over the whole set}``; the same
        on every rank.

    Raises:
        genalign.rewards.RewardError: a reward failed (named in the message).
    """
    expanded = [p for p in prompts for _ in range(vcfg.samples_per_prompt)]
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = list(range(rank, len(expanded), world))
    names = list(rewards.names)
    sums = torch.zeros(len(names) + 1, dtype=torch.float64)
    rows: list[dict[str, Any]] = []
    out = Path(save_dir) if save_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    sample_rate = getattr(objective.model, "sample_rate", None)
    set_rewards = set_rewards or {}
    embeddings: dict[str, list[torch.Tensor]] = {n: [] for n in set_rewards}
    for i in range(0, len(mine), vcfg.batch_size):
        idx = mine[i:i + vcfg.batch_size]
        gens = [torch.Generator().manual_seed(vcfg.seed + j) for j in idx]
        samples = objective.sample([expanded[j] for j in idx], vcfg, gens)
        on_device = samples.to(objective.model.device)
        comps = rewards.components(on_device, [expanded[j] for j in idx])
        for k, name in enumerate(names):
            sums[k] += comps[name].detach().double().sum().item()
        sums[-1] += len(idx)
        for name, reward in set_rewards.items():
            embeddings[name].append(reward.embed(on_device).float().cpu())
        if out is not None:
            for b, j in enumerate(idx):
                file_name = save_sample(out / f"sample_{j:05d}", samples[b], sample_rate)
                rows.append({"file_name": file_name, "index": j, "prompt": expanded[j], "seed": vcfg.seed + j,
                             "sample": j % vcfg.samples_per_prompt,
                             "rewards": {n: float(comps[n][b]) for n in names}})
        if on_batch is not None:
            on_batch(len(idx))
    if out is not None:
        tmp = out / f".metadata.rank{rank}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(out / f"metadata.rank{rank}.jsonl")
    if accelerator is not None and world > 1:
        sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
    result = {name: float(sums[k] / sums[-1]) for k, name in enumerate(names)}
    for name, reward in set_rewards.items():
        local = torch.cat(embeddings[name]) if embeddings[name] else torch.zeros(0)
        if accelerator is not None and world > 1:
            from accelerate.utils import gather_object

            local = torch.cat([e for e in gather_object([local]) if e.numel()])
        result[name] = float(reward.score_embeddings(local.to(objective.model.device)))
    return result


def read_saved_samples(save_dir: str | Path) -> list[dict[str, Any]]:
    """Rows written by :func:`evaluate_rewards` with ``save_dir``, every rank merged, ordered by sample index.

    Each row has ``file_name``, ``index``, ``prompt``, ``seed``, ``sample`` and ``rewards`` (name → value).
    Returns ``[]`` when the folder holds none.
    """
    rows = []
    for f in sorted(Path(save_dir).glob("metadata.rank*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["index"])
