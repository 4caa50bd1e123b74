"""Vendi score: the effective number of distinct items in a set (a set reward for diversity).

Friedman & Dieng 2023, "The Vendi Score: A Diversity Evaluation Metric for Machine Learning", arXiv 2210.02410,
§3 (definition) and §3.3 (order-q generalisation). With X the ``(n, d)`` embeddings, rows L2-normalised, the
cosine kernel ``K = X Xᵀ`` has unit diagonal and the eigenvalues λ of ``K/n`` sum to 1:

- q = 1: ``VS = exp(−Σ λ log λ)`` (Shannon entropy, the paper's default);
- q ∉ {1, ∞}: ``VS_q = exp(log(Σ λ^q) / (1 − q))`` (Rényi entropy); q = 0 counts non-zero eigenvalues;
- q = ∞: ``VS_∞ = 1 / max λ``.

Range [1, n]: n identical items give 1, n mutually orthogonal items give n.

Reimplemented (rewards.md §8) because ``vendi-score`` 0.0.3 ignores ``q`` in ``score_X``, needs the string
``"inf"`` for q = ∞, and its sparse branch keeps only 6 eigenvalues.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from genalign.registry import rewards as REWARDS
from genalign.rewards.base import Reward
from genalign.rewards.fad import resolve_encoder


def _entropy_exp(lam: torch.Tensor, q: float) -> torch.Tensor:
    if q == 1.0:
        return torch.exp(-(lam * lam.log()).sum())
    if math.isinf(q):
        return 1.0 / lam.max()
    return torch.exp(torch.log((lam ** q).sum()) / (1.0 - q))


def vendi_score(embeddings: torch.Tensor, q: float | str = 1.0, normalize: bool = True,
                rel_tol: float = 1e-12) -> torch.Tensor:
    """Vendi score of order q of a set of embeddings (cosine kernel), computed in float64.

    Args:
        embeddings: ``(n, d)`` features (any scale: rows are L2-normalised when ``normalize``; with
            ``normalize=False`` rows must already have unit norm so that ``K`` has a unit diagonal).
        q: order ≥ 0; ``float("inf")`` or the string ``"inf"`` for q = ∞; 1 = Shannon (default).
        normalize: L2-normalise rows first.
        rel_tol: eigenvalues below ``rel_tol · max λ`` are dropped (round-off; ill-conditioned gradients).

    Returns:
        0-dim float64 tensor in [1, n]; differentiable in ``embeddings`` via ``eigvalsh``.

    Raises:
        ValueError: not 2-D, empty, or q < 0.

    Notes:
        Uses the dual ``XᵀX/n`` (d×d) when d < n: it has the same non-zero eigenvalues as ``XXᵀ/n``.

    Source: Friedman & Dieng 2023 (arXiv 2210.02410) §3, §3.3.
    """
    if isinstance(q, str):
        if q.lower() not in ("inf", "infinity"):
            raise ValueError(f"q must be a number or 'inf', got {q!r}")
        q = math.inf
    q = float(q)
    if q < 0:
        raise ValueError(f"q must be >= 0, got {q}")
    x = embeddings.to(torch.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"expected (n, d) embeddings, got shape {tuple(x.shape)}")
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
    n, d = x.shape
    k = (x.T @ x if d < n else x @ x.T) / n
    lam = torch.linalg.eigvalsh(0.5 * (k + k.T))
    lam = lam[lam > rel_tol * lam.max().detach()]
    return _entropy_exp(lam, q)


@REWARDS.register("vendi", "Vendi score (effective number of distinct items; set reward, cosine kernel)")
class Vendi(Reward):
    """Vendi diversity of a set as a set reward: ``r(D) = VS_q(encoder(D))``, higher = more diverse.

    Args:
        q: order (1 = Shannon; ``"inf"`` allowed).
        encoder: ``None`` (samples are ``(N, D)`` embeddings; ``(N, ...)`` inputs are flattened per item), a
            registered reward name with ``embed`` (e.g. ``"pickscore-v1"``, ``"clap"``), or a callable/module.
        encoder_kwargs, tiny, device, weights: forwarded to a named encoder (``weights`` = its weights).

    Shapes: :meth:`forward` → 0-dim float32 in [1, N]; :meth:`contributions` → ``(N,)`` leave-one-out credits
    ``c_i = VS(D) − VS(D∖i)`` (**[recon]**, as for FAD).

    Raises:
        ValueError: invalid q or embeddings.

    Source: Friedman & Dieng 2023 (arXiv 2210.02410); DRAGON (arXiv 2504.15217) uses it as a set reward.
    """

    modality = "image"
    kind = "set"
    differentiable = True
    input_format = "samples → encoder embeddings (N, D) (or any (N, ...) tensor, flattened per item)"
    weights = None
    weight_free = True

    def __init__(self, q: float | str = 1.0, encoder: str | Callable | nn.Module | None = None,
                 encoder_kwargs: dict | None = None, weights: str | None = None, tiny: bool = False,
                 device: str | torch.device | None = None):
        super().__init__()
        kw = dict(encoder_kwargs or {})
        if weights is not None and isinstance(encoder, str) and encoder not in ("identity", "frames"):
            kw.setdefault("weights", weights)
        module, self._embed, self.encoder_id = resolve_encoder(encoder, device=device, tiny=tiny, **kw)
        self.encoder = module
        self.q = q
        vendi_score(torch.eye(2), q)  # validate q early
        self.freeze()

    def embed(self, samples: torch.Tensor, **conditions) -> torch.Tensor:
        """``(N, D)`` embeddings (encoder output flattened per item)."""
        e = self._embed(samples, **conditions)
        return e.reshape(e.shape[0], -1)

    def forward(self, samples: torch.Tensor, prompts: list[str] | None = None, **conditions) -> torch.Tensor:
        return vendi_score(self.embed(samples, **conditions), self.q).float()

    def score_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Vendi score of precomputed embeddings ``(N, D)`` (e.g. gathered over many batches), 0-dim float32."""
        return vendi_score(embeddings.reshape(embeddings.shape[0], -1), self.q).float()

    def contributions(self, samples: torch.Tensor, prompts: list[str] | None = None, **conditions) -> torch.Tensor:
        """Leave-one-out credit ``c_i = VS(D) − VS(D∖i)``, ``(N,)`` float32, no grad."""
        with torch.no_grad():
            e = self.embed(samples, **conditions)
            full = vendi_score(e, self.q)
            out = [full - vendi_score(torch.cat([e[:i], e[i + 1:]]), self.q) for i in range(e.shape[0])]
        return torch.stack(out).float()
