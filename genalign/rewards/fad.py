"""Fréchet (Audio) Distance: a pure float64 torch distance, and dataset-level / per-song FAD rewards.

``FD = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁ Σ₂)^½`` between two Gaussians fitted to embeddings
(Kilgour et al. 2019, "Fréchet Audio Distance", arXiv 1812.08466, §2; the same formula as FID, Heusel et al. 2017).
Lower is better, so the rewards return ``−FD``.

The trace of the matrix square root is computed through a symmetric PSD eigenproblem instead of scipy's
``sqrtm``: with ``S = Σ₂^½`` (eigh), ``tr (Σ₁ Σ₂)^½ = Σ √λ(S Σ₁ S)`` because ``Σ₁Σ₂`` is similar to the PSD
matrix ``S Σ₁ S``. It agrees with ``scipy.linalg.sqrtm`` (frechet-audio-distance) and fadtk to ~1e-12 in float64,
is faster, and is differentiable through ``eigvalsh`` (rewards.md §7).

- **Dataset FAD** (set reward, :class:`FADDataset`): one Gaussian over the whole generated set (all frames of all
  items) against stored reference statistics. Biased in n: compare only at equal n (Gui et al. 2024,
  arXiv 2311.01616). Per-item credit: leave-one-out ``c_i = r(D) − r(D∖i)`` (**[recon]**).
- **Per-song FAD** (instance reward, :class:`FADSong`; fadtk ``score_individual``): a Gaussian over the frame
  embeddings of *one* clip ``(T, D)`` against the reference. Σ is rank-deficient when T ≤ D; the formula stays
  defined.

Encoders: ``encoder=None`` (samples already are embeddings: ``(N, D)`` or ``(N, T, D)``), ``"frames"`` (a latent
``(N, C, T)`` read as T frames of C features, e.g. a diffusion VAE's latent frames, as in DRAGON), the name of any
registered reward that has an ``embed(samples, **conditions)`` method (e.g. ``"clap"``), or any callable/module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from genalign.registry import rewards as REWARDS
from genalign.rewards.base import Reward, WeightsNotFoundError, sha256_file

# ----------------------------------------------------------------------------------------------------------------
# pure functions


def symmetric_sqrt(mat: torch.Tensor) -> torch.Tensor:
    """Principal square root of a symmetric PSD matrix via ``eigh`` (negative round-off eigenvalues → 0).

    Args:
        mat: ``(d, d)`` symmetric PSD (symmetrised internally).

    Returns:
        ``(d, d)`` symmetric ``S`` with ``S @ S ≈ mat``, in ``mat``'s dtype.
    """
    mat = 0.5 * (mat + mat.transpose(-1, -2))
    w, v = torch.linalg.eigh(mat)
    return (v * w.clamp_min(0).sqrt().unsqueeze(-2)) @ v.transpose(-1, -2)


def trace_sqrt_product(cov1: torch.Tensor, cov2: torch.Tensor, eps: float = 1e-12,
                       sqrt_cov2: torch.Tensor | None = None) -> torch.Tensor:
    """``tr (Σ₁ Σ₂)^½`` for symmetric PSD matrices, as ``Σ √λ(S Σ₁ S)`` with ``S = Σ₂^½``.

    Eigenvalues ``≤ eps`` (rank deficiency, round-off) contribute 0; the others are square-rooted. This keeps the
    gradient finite (``d√λ/dλ`` is infinite at 0) at an error of at most ``√eps`` per dropped eigenvalue.

    Args:
        cov1, cov2: ``(d, d)`` covariances (use float64).
        eps: eigenvalue floor.
        sqrt_cov2: precomputed ``Σ₂^½`` (a reference's root is computed once and cached).
    """
    s = symmetric_sqrt(cov2) if sqrt_cov2 is None else sqrt_cov2
    m = s @ cov1 @ s
    m = 0.5 * (m + m.transpose(-1, -2))  # exact symmetry for eigvalsh
    lam = torch.linalg.eigvalsh(m)
    keep = lam > eps
    # sqrt of a clamped copy inside where(): no NaN/inf gradient flows from the dropped branch
    return torch.where(keep, lam.clamp_min(eps).sqrt(), torch.zeros_like(lam)).sum(-1)


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor,
                     eps: float = 1e-12, sqrt_cov2: torch.Tensor | None = None) -> torch.Tensor:
    """Fréchet distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)`` (squared 2-Wasserstein distance).

    ``FD = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁ Σ₂)^½``, computed in float64 whatever the input dtype, and
    differentiable in all four arguments (``eigvalsh`` backward).

    Args:
        mu1, mu2: ``(d,)`` means.
        cov1, cov2: ``(d, d)`` symmetric PSD covariances (may be rank-deficient).
        eps: eigenvalue floor of :func:`trace_sqrt_product`.
        sqrt_cov2: optional cached ``cov2^½`` (float64).

    Returns:
        0-dim float64 tensor ≥ ~0 (tiny negative values from round-off are possible; they are not clamped so
        that tests can see them).

    Raises:
        ValueError: shape mismatch.

    Source: Kilgour et al. 2019 (arXiv 1812.08466) §2; Heusel et al. 2017 (FID); eig-based trace as in
    microsoft/fadtk ``fad.py``.
    """
    mu1, mu2 = mu1.to(torch.float64).reshape(-1), mu2.to(torch.float64).reshape(-1)
    cov1, cov2 = cov1.to(torch.float64), cov2.to(torch.float64)
    d = mu1.shape[0]
    if mu2.shape[0] != d or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu1 {tuple(mu1.shape)}, cov1 {tuple(cov1.shape)}, mu2 {tuple(mu2.shape)}, "
            f"cov2 {tuple(cov2.shape)}"
        )
    if sqrt_cov2 is not None:
        sqrt_cov2 = sqrt_cov2.to(torch.float64)
    diff = mu1 - mu2
    tr_sqrt = trace_sqrt_product(cov1, cov2, eps=eps, sqrt_cov2=sqrt_cov2)
    return diff.dot(diff) + torch.diagonal(cov1).sum() + torch.diagonal(cov2).sum() - 2.0 * tr_sqrt


def gaussian_stats(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and **unbiased** (n−1) covariance of ``(n, d)`` embeddings, in float64 (differentiable).

    Raises:
        ValueError: fewer than 2 rows (the covariance is undefined).
    """
    x = embeddings.to(torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need (n >= 2, d) embeddings for a covariance, got shape {tuple(x.shape)}")
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


# ----------------------------------------------------------------------------------------------------------------
# reference statistics


@dataclass
class ReferenceStats:
    """Gaussian statistics of a reference set (float64), with the metadata needed to reuse them safely.

    Attributes:
        mu: ``(d,)`` mean. cov: ``(d, d)`` unbiased covariance. n: number of embeddings (frames) used.
        meta: free-form strings (encoder id, sample rate, window settings, source data), saved with the file.
    """

    mu: torch.Tensor
    cov: torch.Tensor
    n: int = 0
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mu = self.mu.detach().to(torch.float64).reshape(-1)
        self.cov = self.cov.detach().to(torch.float64)
        self._sqrt: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @property
    def sqrt_cov(self) -> torch.Tensor:
        """``cov^½``, computed once (the expensive part of every FD against this reference)."""
        if self._sqrt is None:
            self._sqrt = symmetric_sqrt(self.cov)
        return self._sqrt

    @classmethod
    def from_embeddings(cls, embeddings: torch.Tensor, **meta: str) -> "ReferenceStats":
        """Fit from ``(n, d)`` embeddings (or ``(N, T, d)`` frames, flattened to ``(N·T, d)``)."""
        e = embeddings.detach()
        if e.ndim == 3:
            e = e.reshape(-1, e.shape[-1])
        mu, cov = gaussian_stats(e)
        return cls(mu, cov, n=int(e.shape[0]), meta={k: str(v) for k, v in meta.items()})

    def save(self, path: str | Path) -> str:
        """Save as safetensors (``mu``, ``cov`` float64; ``n`` and ``meta`` in the header). Returns the sha256."""
        from safetensors.torch import save_file

        header = {"n": str(self.n), "meta": json.dumps(self.meta, sort_keys=True)}
        save_file({"mu": self.mu.contiguous(), "cov": self.cov.contiguous()}, str(path), metadata=header)
        return sha256_file(path)

    @classmethod
    def load(cls, path: str | Path, sha256: str | None = None) -> "ReferenceStats":
        """Load a file written by :meth:`save` (or any safetensors / ``.npz`` with ``mu`` and ``cov``/``sigma``).

        Raises:
            WeightsNotFoundError: missing file. ValueError: sha256 mismatch or missing keys.
        """
        path = Path(path)
        if not path.exists():
            raise WeightsNotFoundError(f"FAD reference statistics {str(path)!r} do not exist")
        if sha256 is not None and sha256_file(path) != sha256:
            raise ValueError(f"sha256 mismatch for FAD reference statistics {path}")
        if path.suffix == ".npz":
            import numpy as np

            data = np.load(path)
            cov_key = "cov" if "cov" in data else "sigma"
            return cls(torch.from_numpy(data["mu"]), torch.from_numpy(data[cov_key]), n=int(data.get("n", 0)))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            keys = set(f.keys())
            if "mu" not in keys or not ({"cov", "sigma"} & keys):
                raise ValueError(f"{path}: expected tensors 'mu' and 'cov', found {sorted(keys)}")
            mu = f.get_tensor("mu")
            cov = f.get_tensor("cov" if "cov" in keys else "sigma")
        return cls(mu, cov, n=int(header.get("n", 0)), meta=json.loads(header.get("meta", "{}")))


# ----------------------------------------------------------------------------------------------------------------
# encoders shared by the set rewards (also used by vendi.py)


class _Frames(nn.Module):
    """``(N, C, T)`` latents → ``(N, T, C)`` frame embeddings (C features per frame)."""

    def forward(self, x: torch.Tensor, **_: Any) -> torch.Tensor:
        if x.ndim != 3:
            raise ValueError(f"'frames' encoder expects (N, C, T), got {tuple(x.shape)}")
        return x.transpose(1, 2)


class _Identity(nn.Module):
    def forward(self, x: torch.Tensor, **_: Any) -> torch.Tensor:
        return x


def resolve_encoder(encoder: str | Callable | nn.Module | None, device=None, tiny: bool = False,
                    **encoder_kwargs: Any) -> tuple[nn.Module | None, Callable[..., torch.Tensor], str]:
    """Turn an encoder spec into ``(module_to_register_or_None, embed_fn, encoder_id)``.

    Args:
        encoder: ``None``/``"identity"`` (inputs are embeddings), ``"frames"`` (``(N, C, T)`` → ``(N, T, C)``),
            a registered reward name whose class has ``embed(samples, **conditions)`` (e.g. ``"clap"``,
            ``"pickscore-v1"``), or a callable / ``nn.Module`` returning ``(N, D)`` or ``(N, T, D)``.
        device, tiny, encoder_kwargs: forwarded to the reward constructor when ``encoder`` is a name.

    Raises:
        ValueError: a registered reward without an ``embed`` method.
        KeyError: an unknown name.
    """
    if encoder is None or encoder == "identity":
        mod = _Identity()
        return mod, mod, "identity"
    if encoder == "frames":
        mod = _Frames()
        return mod, mod, "frames"
    if isinstance(encoder, str):
        cls = REWARDS.get(encoder)
        if not hasattr(cls, "embed"):
            raise ValueError(f"reward {encoder!r} has no embed() method, so it cannot serve as an encoder")
        mod = cls(device=device, tiny=tiny, **encoder_kwargs)
        return mod, mod.embed, encoder
    if isinstance(encoder, nn.Module):
        return encoder, encoder, type(encoder).__name__
    if callable(encoder):
        return None, encoder, getattr(encoder, "__name__", "callable")
    raise TypeError(f"unsupported encoder {encoder!r}")


def _load_reference(reference, weights, tiny: bool, tiny_dim: int) -> ReferenceStats:
    ref = reference if reference is not None else weights
    if isinstance(ref, ReferenceStats):
        return ref
    if isinstance(ref, dict):
        return ReferenceStats(torch.as_tensor(ref["mu"]), torch.as_tensor(ref["cov"]), n=int(ref.get("n", 0)))
    if ref is not None:
        return ReferenceStats.load(ref)
    if tiny:
        # tests/smoke runs only: a standard-normal reference of dimension tiny_dim
        return ReferenceStats(torch.zeros(tiny_dim), torch.eye(tiny_dim), n=0, meta={"note": "tiny N(0, I)"})
    raise WeightsNotFoundError(
        "FAD needs reference statistics: pass `reference: /path/stats.safetensors` (see "
        "ReferenceStats.from_embeddings(...).save(path)) or a ReferenceStats object"
    )


class _FADBase(Reward):
    modality = "audio"
    differentiable = True  # in the embeddings (and the input, when the encoder is differentiable)
    weights = None

    def __init__(self, reference: str | Path | ReferenceStats | dict | None = None,
                 encoder: str | Callable | nn.Module | None = None, encoder_kwargs: dict | None = None,
                 eps: float = 1e-12, weights: str | None = None, tiny: bool = False, tiny_dim: int = 8,
                 device: str | torch.device | None = None):
        super().__init__()
        self.reference = _load_reference(reference, weights, tiny, tiny_dim)
        module, self._embed, self.encoder_id = resolve_encoder(encoder, device=device, tiny=tiny,
                                                               **(encoder_kwargs or {}))
        self.encoder = module  # registered as a submodule (frozen with the reward)
        self.eps = float(eps)
        self.freeze()

    def embed(self, samples: torch.Tensor, **conditions) -> torch.Tensor:
        """Encoder output: ``(N, D)`` or ``(N, T, D)``."""
        return self._embed(samples, **conditions)

    def _fd(self, emb: torch.Tensor, ref: ReferenceStats) -> torch.Tensor:
        if emb.shape[-1] != ref.dim:
            raise ValueError(f"embedding dim {emb.shape[-1]} != reference dim {ref.dim} ({self.encoder_id})")
        mu, cov = gaussian_stats(emb)
        return frechet_distance(mu, cov, ref.mu.to(emb.device), ref.cov.to(emb.device), eps=self.eps,
                                sqrt_cov2=ref.sqrt_cov.to(emb.device))


@REWARDS.register("fad-dataset", "−Fréchet Audio Distance of the whole set vs reference stats (set reward)")
class FADDataset(_FADBase):
    """Dataset-level FAD as a set reward: ``r(D) = −FD(N(μ_D, Σ_D), N(μ_ref, Σ_ref))``.

    One Gaussian over all embeddings of the set (frame embeddings ``(N, T, D)`` are pooled to ``(N·T, D)``, as
    fadtk does). Needs many more embeddings than dimensions for a stable Σ; compare only at equal set size.

    Args:
        reference: :class:`ReferenceStats`, a safetensors/npz path, or ``{"mu", "cov"}``; ``weights`` is an alias
            for a path. ``tiny=True`` without a reference uses ``N(0, I_tiny_dim)`` (tests).
        encoder: see module docstring. encoder_kwargs: constructor kwargs of a named encoder.
        eps: eigenvalue floor for ``√λ``.

    Shapes: samples → encoder → ``(N, D)``/``(N, T, D)``; :meth:`forward` returns a 0-dim float32 (``−FD``, ≤ 0);
    :meth:`contributions` returns ``(N,)`` leave-one-out credits (higher = the item helps).

    Raises:
        WeightsNotFoundError: no reference statistics. ValueError: dimension mismatch or fewer than 2 embeddings.

    Source: Kilgour et al. 2019 (arXiv 1812.08466); DRAGON (arXiv 2504.15217) uses it as a set reward;
    leave-one-out credit is a genalign reconstruction (**[recon]**).
    """

    kind = "set"
    input_format = "samples → encoder embeddings (N, D) or (N, T, D); scalar output"

    def _flat(self, emb: torch.Tensor) -> torch.Tensor:
        return emb.reshape(-1, emb.shape[-1]) if emb.ndim == 3 else emb

    def forward(self, samples: torch.Tensor, prompts: list[str] | None = None, **conditions) -> torch.Tensor:
        ref = conditions.get("reference_stats", self.reference)
        return -self._fd(self._flat(self.embed(samples, **_enc_conditions(conditions))), ref).float()

    def score_embeddings(self, embeddings: torch.Tensor, reference_stats: ReferenceStats | None = None) -> torch.Tensor:
        """``−FD`` of precomputed encoder outputs ``(N, D)`` / ``(N, T, D)`` (e.g. gathered over many batches)."""
        return -self._fd(self._flat(embeddings), reference_stats or self.reference).float()

    def contributions(self, samples: torch.Tensor, prompts: list[str] | None = None, **conditions) -> torch.Tensor:
        """Leave-one-out credit ``c_i = r(D) − r(D∖i)`` for each of the N items, ``(N,)`` float32 (no grad).

        Cost: N + 1 eigen-decompositions of a ``(D, D)`` matrix.
        """
        ref = conditions.get("reference_stats", self.reference)
        with torch.no_grad():
            emb = self.embed(samples, **_enc_conditions(conditions))
            full = -self._fd(self._flat(emb), ref)
            out = []
            for i in range(emb.shape[0]):
                rest = torch.cat([emb[:i], emb[i + 1:]])
                out.append(full - (-self._fd(self._flat(rest), ref)))
        return torch.stack(out).float()


@REWARDS.register("fad-song", "−per-song FAD: Gaussian of one clip's frame embeddings vs reference stats")
class FADSong(_FADBase):
    """Per-song (per-instance) FAD: ``r_i = −FD(N(μ_i, Σ_i), N(μ_ref, Σ_ref))`` over the T frames of clip i.

    The encoder must give frame embeddings ``(B, T, D)`` (e.g. ``encoder="frames"`` on VAE latents ``(B, C, T)``).
    When T ≤ D, Σ_i is rank-deficient; the distance is still defined (its eigenvalues ≤ eps count as 0).
    A ``reference_stats=ReferenceStats`` condition overrides the constructor's reference for one call.

    Args: as :class:`FADDataset`.

    Shapes: ``(B, T, D)`` after the encoder → ``(B,)`` float32 (``−FD``, ≤ 0). Differentiable in the frames.

    Raises:
        ValueError: encoder output is not ``(B, T, D)`` with T ≥ 2, or a dimension mismatch.

    Source: fadtk ``score_individual`` (Gui et al. 2024, arXiv 2311.01616); DRAGON (arXiv 2504.15217).
    """

    kind = "instance"
    input_format = "samples → encoder frame embeddings (B, T, D), T >= 2"

    def forward(self, samples: torch.Tensor, prompts: list[str] | None = None, **conditions) -> torch.Tensor:
        ref = conditions.get("reference_stats", self.reference)
        emb = self.embed(samples, **_enc_conditions(conditions))
        if emb.ndim != 3:
            raise ValueError(f"fad-song needs frame embeddings (B, T, D); encoder gave {tuple(emb.shape)}")
        return torch.stack([-self._fd(e, ref) for e in emb]).float()


def _enc_conditions(conditions: dict) -> dict:
    # the reference is ours, not the encoder's
    return {k: v for k, v in conditions.items() if k != "reference_stats"}


__all__ = [
    "FADDataset",
    "FADSong",
    "ReferenceStats",
    "frechet_distance",
    "gaussian_stats",
    "resolve_encoder",
    "symmetric_sqrt",
    "trace_sqrt_product",
]
