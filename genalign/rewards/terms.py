"""Reward terms of a distribution-reward run: per-item values of instance and set rewards over one generated set.

A *term* couples a registered reward with (optionally) a feature encoder and an exemplar set, and answers the two
questions DRAGON asks of every reward (dragon.md §2.4, [recon]): the value of the whole generated set, and a
per-item value — the instance score, or for a set-level reward the leave-one-out credit c_i = r(D) − r(D ∖ {i}).

Encoders (:class:`FeatureEncoder`): ``digits`` (digit-classifier 128-d features), ``pixels`` (flattened),
``frames`` (``(N, C, T)`` latents → T frames, "VAE-FAD"), or a registered reward with ``embed`` (``clap``; its text
tower embeds caption exemplars).

Source: fadtk / frechet-audio-distance (FAD, per-song FAD), vendi-score (Vendi) through genalign's rewards.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from genalign.registry import rewards as REWARDS
from genalign.rewards.digits import DigitClassifierReward
from genalign.rewards.fad import ReferenceStats
from genalign.rewards.normalize import rank_normalize, zscore

__all__ = ["FeatureEncoder", "RewardTerm", "CompositeTerm", "leave_one_out_contributions", "evaluate_terms",
           "combined_values"]


def leave_one_out_contributions(items: torch.Tensor, set_reward_fn) -> torch.Tensor:
    """Leave-one-out credit c_i = r(D) − r(D ∖ {i}) for a set reward ([recon], dragon.md §2.4).

    Args:
        items: (N, ...) set-reward inputs of the N generations, N ≥ 2 (the set reward must accept N − 1 items).
        set_reward_fn: maps a stacked (M, ...) tensor to a scalar (higher is better).

    Returns:
        (N,) float64 tensor; an item that hurts the set (e.g. an outlier far from the reference statistics of a
        −FAD reward) gets a negative, lowest credit. N + 1 reward evaluations.

    Raises:
        ValueError: N < 2 or non-finite rewards.
    """
    if items.ndim < 1 or items.shape[0] < 2:
        raise ValueError(f"items must have shape (N, ...) with N >= 2, got {tuple(items.shape)}")
    n = items.shape[0]
    full = float(set_reward_fn(items))
    out = torch.empty(n, dtype=torch.float64)
    idx = torch.arange(n, device=items.device)
    for i in range(n):
        out[i] = full - float(set_reward_fn(items[idx != i]))
    if not torch.isfinite(out).all() or not torch.isfinite(torch.tensor(full)):
        raise ValueError("set_reward_fn returned a non-finite value")
    return out


class FeatureEncoder(torch.nn.Module):
    """Samples (or latents) → embeddings for distribution rewards.

    Args:
        kind: "digits", "pixels", "frames", or a registered reward name with ``embed`` (e.g. "clap").
        device: where a network encoder runs. tiny: build a reward's tiny random variant (tests).

    Raises:
        ValueError: a reward name whose class has no ``embed``.
    """

    def __init__(self, kind: str, device=None, tiny: bool = False):
        super().__init__()
        self.kind = kind
        self.net = None
        if kind == "digits":
            self.net = DigitClassifierReward(device=device)
        elif kind not in ("pixels", "frames"):
            cls = REWARDS.get(kind)
            if not hasattr(cls, "embed"):
                raise ValueError(f"encoder {kind!r}: reward has no embed() method")
            takes_tiny = "tiny" in inspect.signature(cls.__init__).parameters
            self.net = cls(device=device, tiny=tiny) if takes_tiny else cls(device=device)

    def forward(self, x: torch.Tensor, **conditions) -> torch.Tensor:
        """``(N, ...)`` → ``(N, E)`` embeddings, or ``(N, T, E)`` frames for ``frames``.

        Raises:
            ValueError: ``frames`` on a tensor that is not ``(N, C, T)``.
        """
        if self.kind == "digits":
            return self.net.features(x)
        if self.kind == "pixels":
            return x.reshape(x.shape[0], -1).float()
        if self.kind == "frames":
            if x.ndim != 3:
                raise ValueError(f"'frames' encoder expects (N, C, T) latents, got {tuple(x.shape)}")
            return x.transpose(1, 2)
        return self.net.embed(x, **conditions)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Caption exemplars → ``(M, E)`` with the encoder's text tower.

        Raises:
            ValueError: the encoder has no text tower.
        """
        if not hasattr(self.net, "encode_text"):
            raise ValueError(f"text exemplars need a text-capable encoder (clap), got {self.kind!r}")
        return self.net.encode_text(texts)


class RewardTerm:
    """One built reward term: instance scores or set value + leave-one-out credit over a generated set.

    Args:
        name: a registered reward, or ``exemplar_fd`` (= ``fad-dataset`` with reference statistics computed from
            the exemplars with ``encoder``).
        kwargs: the reward's constructor arguments.
        kind: "auto" (the reward's own ``kind``), "instance" or "set".
        input: "samples" (decoded images / waveforms) or "latents" (generation latents).
        encoder: a :class:`FeatureEncoder` kind, or None for the reward's default.
        exemplars: the loaded exemplar set (tensor or captions) or None; ``exemplars_name`` labels it.
        model: the pipeline adapter (``encode`` for latent-space exemplars, ``sample_rate``).
        device: reward device.
        weight, normalize: how :func:`combined_values` weighs this term's per-item values after normalising them
            within the set (none | zscore | rank).

    Raises:
        ValueError: exemplars without an encoder, or a set term whose reward has no ``embed``.
    """

    def __init__(self, name: str, kwargs: dict[str, Any] | None = None, kind: str = "auto", input: str = "samples",
                 encoder: str | None = None, exemplars: Any = None, exemplars_name: str | None = None, model=None,
                 device=None, weight: float = 1.0, normalize: str = "none"):
        self.model, self.input, self.weight, self.normalize = model, input, float(weight), normalize
        kw = dict(kwargs or {})
        enc = FeatureEncoder(encoder, device, bool(kw.get("tiny", False))) if encoder else None
        if exemplars is not None:
            if enc is None:
                raise ValueError(f"reward {name!r}: exemplars need an encoder")
            with torch.no_grad():
                if isinstance(exemplars, list):
                    feats = enc.embed_texts(exemplars)
                else:
                    if input == "latents":
                        exemplars = torch.cat([model.encode(exemplars[i:i + 32]).float().cpu()
                                               for i in range(0, len(exemplars), 32)])
                    feats = enc(exemplars, **self._cond())
            kw["reference"] = ReferenceStats.from_embeddings(feats.detach().cpu(), source=exemplars_name or "",
                                                             encoder=encoder or "")
        if enc is not None:
            kw["encoder"] = enc
        self.reward = REWARDS.get("fad-dataset" if name == "exemplar_fd" else name)(**kw)
        self.kind = kind if kind != "auto" else getattr(self.reward, "kind", "instance")
        if self.kind == "set" and not hasattr(self.reward, "embed"):
            raise ValueError(f"reward {name!r} used as a set reward needs embed() and score_embeddings()")
        self.label = name if not exemplars_name else f"{name}@{exemplars_name}"

    def _cond(self) -> dict:
        sr = getattr(self.model, "sample_rate", None)
        return {"sample_rate": sr} if sr else {}

    def set_fn(self, items: torch.Tensor) -> float:
        """r(D) of stacked items (higher is better).

        Raises:
            ValueError: the reward has no ``score_embeddings``.
        """
        if not hasattr(self.reward, "score_embeddings"):
            raise ValueError(f"{self.label}: no score_embeddings()")
        return float(self.reward.score_embeddings(items))

    @torch.no_grad()
    def evaluate(self, samples: torch.Tensor, latents: torch.Tensor, prompts: list[str]) -> dict[str, Any]:
        """``{"kind": "instance", "values": (N,)}`` or ``{"kind": "set", "items": (N, ...), "value": r(D)}``."""
        x = latents if self.input == "latents" else samples
        if self.kind == "instance":
            return {"kind": "instance", "values": self.reward(x, prompts, **self._cond()).float().cpu().reshape(-1)}
        items = self.reward.embed(x, **self._cond()).detach().float().cpu()
        return {"kind": "set", "items": items, "value": self.set_fn(items)}

    def per_item(self, ev: dict[str, Any]) -> torch.Tensor:
        """(N,) float64 per-item values: instance scores, or leave-one-out credit for set rewards."""
        if ev["kind"] == "instance":
            return ev["values"].double()
        return leave_one_out_contributions(ev["items"], self.set_fn)


class CompositeTerm:
    """A run's :class:`~genalign.rewards.composite.CompositeReward` as one instance term (label "composite",
    weight 1, no normalisation), so a reward run without explicit terms reads the same."""

    kind, label, weight, normalize = "instance", "composite", 1.0, "none"

    def __init__(self, composite, device=None):
        self.composite, self.device = composite, device

    @torch.no_grad()
    def evaluate(self, samples: torch.Tensor, latents: torch.Tensor, prompts: list[str]) -> dict[str, Any]:
        """``{"kind": "instance", "values": (N,)}`` from ``composite.score``."""
        return {"kind": "instance", "values": self.composite.score(samples.to(self.device), prompts).float().cpu()
                .reshape(-1)}

    def per_item(self, ev: dict[str, Any]) -> torch.Tensor:
        """(N,) float64 instance scores."""
        return ev["values"].double()


def evaluate_terms(terms: list, samples: torch.Tensor, latents: torch.Tensor, prompts: list[str]) -> list[dict]:
    """Every term's evaluation of one generated set (``RewardTerm.evaluate``), in order."""
    return [t.evaluate(samples, latents, prompts) for t in terms]


def combined_values(terms: list, evals: list[dict[str, Any]]) -> torch.Tensor:
    """(N,) float64 ``Σ_k w_k·N_k(v_k)``: v_k the instance scores or leave-one-out credits of term k, N_k its
    within-set normalisation (none, zscore with eps 1e-12, or rank in [0, 1])."""
    total = None
    for t, ev in zip(terms, evals):
        v = t.per_item(ev).double()
        v = zscore(v, eps=1e-12) if t.normalize == "zscore" else rank_normalize(v) if t.normalize == "rank" else v
        total = t.weight * v if total is None else total + t.weight * v
    if total is None:
        raise ValueError("combined_values needs at least one term")
    return total
