"""Weighted sums of rewards, with per-member normalisation and logging, plus a running normaliser.

``CompositeReward`` computes ``R = Σ_k w_k · N_k(r_k)`` over *instance* rewards and records every member before
and after normalisation/weighting in ``last_metrics`` (``reward/<name>``, ``reward/<name>/std``,
``reward/<name>/weighted``, ``reward/total``), so that reward hacking of one member stays visible
(rewards.md §11; Flow-GRPO #233, DanceGRPO #12/#85). Weighting and normalisation live here, never inside a
reward.

Normalisation ``N_k`` (per member):

- ``"none"``: raw scores.
- ``"zscore"``: ``(r − mean_batch) / (std_batch + 1e-8)``, statistics of the **current batch** (population std);
  a batch of 1 gives 0. Differentiable (gradients also flow through the batch statistics).
- ``"rank"``: the within-batch rank mapped to [0, 1] (``rank / (B − 1)``, ties share their average rank); a batch
  of 1 gives 0.5. Not differentiable.
- ``"running"`` (extension): :class:`RunningNorm` with statistics accumulated over training batches, stored as
  buffers in the composite's ``state_dict``.

Within-batch statistics make a sample's value depend on its batch-mates; per-prompt (GRPO) advantage
normalisation belongs to the trainer, not here.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from torch import nn

from genalign.config import RewardItem
from genalign.rewards.base import Reward
from genalign.rewards.normalize import rank_normalize, zscore

Normalize = Literal["none", "zscore", "rank", "running"]
_NORMALIZERS = ("none", "zscore", "rank", "running")


class RewardError(RuntimeError):
    """A reward model raised while scoring; the message names the reward."""


RewardSpec = RewardItem  # one config shape for a reward member everywhere: ``genalign.config.RewardItem``


def coerce_spec(spec: "RewardItem | dict | str") -> RewardItem:
    """A reward member from a :class:`~genalign.config.RewardItem`, a dict with its fields, or a bare name.

    Raises:
        TypeError: unknown dict keys (constructor arguments belong in ``kwargs``) or another type.
        ValueError: an invalid field value (e.g. an unknown ``normalize``).
    """
    if isinstance(spec, RewardItem):
        return spec
    if isinstance(spec, str):
        return RewardItem(name=spec)
    if isinstance(spec, dict):
        unknown = set(spec) - set(RewardItem.model_fields)
        if unknown:
            raise TypeError(f"unknown reward fields {sorted(unknown)}; put constructor args in 'kwargs'")
        return RewardItem(**spec)
    raise TypeError(f"cannot make a reward member from {type(spec).__name__}")


class RunningStats(nn.Module):
    """Running mean/variance of scalar scores, kept as float64 **buffers** (saved in the ``state_dict``).

    Args:
        momentum: ``None`` = exact statistics over every score seen (Chan et al. parallel update); a float in
            (0, 1] = exponential moving average ``stat ← (1 − m)·stat + m·batch_stat``.
        eps: variance floor used by :meth:`normalize`.

    Initial state: mean 0, var 1, count 0 (so normalisation is the identity until the first update).
    """

    def __init__(self, momentum: float | None = None, eps: float = 1e-8):
        super().__init__()
        if momentum is not None and not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1] or None, got {momentum}")
        self.momentum = momentum
        self.eps = float(eps)
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("var", torch.ones((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, scores: torch.Tensor) -> None:
        """Fold a batch of raw scores ``(B,)`` into the statistics."""
        x = scores.detach().to(torch.float64).flatten()
        if x.numel() == 0:
            return
        bm, bv, bn = x.mean(), x.var(unbiased=False), float(x.numel())
        if self.count == 0:
            self.mean.copy_(bm)
            self.var.copy_(bv)
        elif self.momentum is None:
            n = self.count.clone()
            tot = n + bn
            delta = bm - self.mean
            self.var.copy_((self.var * n + bv * bn + delta**2 * n * bn / tot) / tot)
            self.mean.add_(delta * bn / tot)
        else:
            m = float(self.momentum)
            self.mean.mul_(1 - m).add_(m * bm)
            self.var.mul_(1 - m).add_(m * bv)
        self.count.add_(bn)

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        """``(r − mean) / sqrt(var + eps)`` with the current statistics (differentiable in ``scores``)."""
        mean = self.mean.to(device=scores.device, dtype=scores.dtype)
        std = (self.var + self.eps).sqrt().to(device=scores.device, dtype=scores.dtype)
        return (scores - mean) / std

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """Update (in training mode only), then normalise."""
        if self.training:
            self.update(scores)
        return self.normalize(scores)


class RunningNorm(Reward):
    """Wrap a reward and standardise it with running statistics: ``(r − μ) / sqrt(σ² + eps)``.

    The statistics (:class:`RunningStats`: ``stats.mean``, ``stats.var``, ``stats.count``, float64) are buffers,
    so they are saved in the ``state_dict`` and survive checkpoint/resume. They are updated from each batch
    only while the wrapper is in training mode (``.train()``); in eval mode (the default) they are frozen. The
    wrapped reward itself always stays in eval mode.

    Args:
        reward: the instance reward to normalise.
        momentum: ``None`` (exact running statistics) or an EMA factor in (0, 1].
        eps: variance floor.

    Shapes: as the wrapped reward, ``(B,)``. Before the first update the output equals the raw scores.

    Raises:
        ValueError: ``reward`` is not an instance reward.

    Source: rewards.md §11 (``RunningNorm`` transform); genalign's own.
    """

    kind = "instance"

    def __init__(self, reward: Reward, momentum: float | None = None, eps: float = 1e-8):
        super().__init__()
        if getattr(reward, "kind", "instance") != "instance":
            raise ValueError("RunningNorm only wraps instance rewards")
        self.reward = reward
        self.stats = RunningStats(momentum, eps)
        self.modality = reward.modality  # type: ignore[misc]
        self.differentiable = reward.differentiable  # type: ignore[misc]
        self.input_format = reward.input_format  # type: ignore[misc]
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "RunningNorm":
        """Training mode enables statistics updates; the wrapped reward stays in eval mode."""
        self.training = mode
        self.stats.train(mode)
        self.reward.train(False)
        return self

    def forward(self, samples: torch.Tensor, prompts: list[str] | None = None, **conditions) -> torch.Tensor:
        return self.stats(self.reward(samples, prompts, **conditions))


def build_reward(name: str, kwargs: dict, common: dict, device) -> Reward:
    """Instantiate the registered reward ``name`` with its ``kwargs`` (strict) and the ``common`` kwargs it accepts
    (e.g. ``tiny=True``), on ``device``.

    Raises:
        KeyError: unknown reward name (the known ones are listed). TypeError: a kwarg the reward does not take.
    """
    from genalign.registry import rewards as REWARDS

    cls = REWARDS.get(name)
    params = inspect.signature(cls.__init__).parameters
    accepts_var = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    # common kwargs (e.g. tiny=True) go only to rewards that accept them; spec kwargs are passed strictly
    kw = {k: v for k, v in common.items() if accepts_var or k in params}
    if device is not None and (accepts_var or "device" in params):
        kw["device"] = device
    kw.update(kwargs)
    reward = cls(**kw)
    if device is not None:
        reward = reward.to(device)
    return reward


class CompositeReward(nn.Module):
    """``R(x) = Σ_k w_k · N_k(r_k(x))`` over instance rewards, logging every member.

    Build with :meth:`from_specs`. Members are called with the same ``(samples, prompts, **conditions)``;
    rewards ignore conditions they do not use.

    Attributes:
        names: member names (the registered name; a repeated name gets ``#2``, ``#3`` ... suffixes).
        weights: member weights. normalizers: member normalisation modes.
        last_metrics: filled on every :meth:`forward` with Python floats: ``reward/<name>`` (raw batch mean),
            ``reward/<name>/std`` (raw batch population std), ``reward/<name>/weighted`` (mean of
            ``w·N(r)``) and ``reward/total`` (mean of R).

    Shapes: samples as the members expect → ``(B,)`` float32.

    Mode: like any ``nn.Module`` it starts in training mode, so ``"running"`` statistics update on every call
    until ``.eval()``; members themselves always stay in eval mode (dropout off).

    Raises:
        ValueError: a set reward (scalar output) as a member, an empty spec list, or members that disagree on B.
    """

    def __init__(self, members: list[tuple[str, Reward, float, str]]):
        super().__init__()
        if not members:
            raise ValueError("CompositeReward needs at least one member")
        names: list[str] = []
        for name, reward, _, norm in members:
            if getattr(reward, "kind", "instance") == "set":
                raise ValueError(
                    f"reward {name!r} is a set reward (scalar per set); composites sum instance rewards. Use its "
                    "contributions() for per-item credit instead"
                )
            if norm not in _NORMALIZERS:
                raise ValueError(f"normalize must be one of {_NORMALIZERS}, got {norm!r}")
            unique, i = name, 2
            while unique in names:
                unique, i = f"{name}#{i}", i + 1
            names.append(unique)
        self.names: list[str] = names
        self.weights: list[float] = [float(m[2]) for m in members]
        self.normalizers: list[str] = [m[3] for m in members]
        self.members = nn.ModuleList([m[1] for m in members])
        # running statistics are buffers of these wrappers → in this module's state_dict
        self.running = nn.ModuleDict({str(i): RunningStats() for i, m in enumerate(members) if m[3] == "running"})
        self.last_metrics: dict[str, float] = {}

    @classmethod
    def from_specs(cls, specs: list[RewardSpec | dict], device: str | torch.device | None = None,
                   **common_kwargs: Any) -> "CompositeReward":
        """Build from specs (``RewardSpec``, dicts, or bare names).

        Args:
            specs: members. device: moved there and passed to constructors that take ``device``.
            common_kwargs: passed to every member constructor that accepts them (e.g. ``tiny=True``);
                a spec's own ``kwargs`` win and are passed strictly (a typo raises ``TypeError``).

        Raises:
            KeyError: unknown reward name (lists the known ones). TypeError: bad spec fields / kwargs.
        """
        members = []
        for raw in specs:
            spec = coerce_spec(raw)
            reward = build_reward(spec.name, spec.kwargs, common_kwargs, device)
            members.append((spec.name, reward, spec.weight, spec.normalize))
        out = cls(members)
        return out.to(device) if device is not None else out

    @property
    def differentiable(self) -> bool:
        """True iff every member is differentiable and no member uses rank normalisation."""
        return all(bool(m.differentiable) for m in self.members) and "rank" not in self.normalizers

    def train(self, mode: bool = True) -> "CompositeReward":
        """Members stay in eval mode; only running normalisers follow ``mode`` (statistics updates)."""
        self.training = mode
        for m in self.members:
            m.train(False)
        for r in self.running.values():
            r.train(mode)
        return self

    def components(self, samples: torch.Tensor, prompts: list[str] | None = None,
                   **conditions) -> dict[str, torch.Tensor]:
        """Raw ``(B,)`` scores of every member, keyed by name (no normalisation or weighting).

        Raises:
            RewardError: a member raised; the message names the reward and the original error.
        """
        out = {}
        for n, m in zip(self.names, self.members):
            try:
                out[n] = m(samples, prompts, **conditions)
            except RewardError:
                raise
            except Exception as err:  # name the failing member: a bare traceback from deep inside a model is useless
                raise RewardError(f"reward {n!r} failed on a batch of {samples.shape[0]}: "
                                  f"{type(err).__name__}: {err}") from err
        return out

    def _normalize(self, i: int, raw: torch.Tensor) -> torch.Tensor:
        mode = self.normalizers[i]
        if mode == "zscore":
            return zscore(raw)
        if mode == "rank":
            return rank_normalize(raw)
        if mode == "running":
            return self.running[str(i)](raw)
        return raw

    def forward(self, samples: torch.Tensor, prompts: list[str] | None = None, **conditions) -> torch.Tensor:
        comps = self.components(samples, prompts, **conditions)
        total = None
        metrics: dict[str, float] = {}
        for i, (name, raw) in enumerate(comps.items()):
            raw = raw.float().reshape(-1)
            weighted = self.weights[i] * self._normalize(i, raw)
            d = raw.detach()
            metrics[f"reward/{name}"] = d.mean().item()
            metrics[f"reward/{name}/std"] = d.std(unbiased=False).item() if d.numel() > 1 else 0.0
            metrics[f"reward/{name}/weighted"] = weighted.detach().mean().item()
            if total is not None and total.shape != weighted.shape:
                raise ValueError(f"member {name!r} returned {tuple(weighted.shape)}, expected {tuple(total.shape)}")
            total = weighted if total is None else total + weighted
        assert total is not None
        metrics["reward/total"] = total.detach().mean().item()
        self.last_metrics = metrics
        return total

    @torch.no_grad()
    def score(self, samples: torch.Tensor, prompts: list[str] | None = None, **conditions) -> torch.Tensor:
        """:meth:`forward` without autograd."""
        return self.forward(samples, prompts, **conditions)


__all__ = ["CompositeReward", "RewardSpec", "build_reward", "coerce_spec", "RunningNorm", "RunningStats", "rank_normalize", "zscore"]
