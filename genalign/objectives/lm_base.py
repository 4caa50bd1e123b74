"""Shared base of the (video-)language-model objectives (DPO, RPO, f-DPO, T-REG, RRPO) trained on TRL.

An LM objective is one registry entry with a typed ``Config`` (like every genalign objective) and answers one
question for the TRL trainer (:mod:`genalign.training.lm.trainers`): *what is the loss of this batch?* The trainer
hands it a :class:`TokenForward` — lazy access to per-token policy / reference log-probs (and, for objectives that
need them, the full-vocabulary token KL) on TRL's ``[chosen; rejected]`` layout — and the objective returns an
:class:`LMLossOutput`. So a new LM objective is one new file; the trainer holds no per-method branch.

Conventions: ``B`` pairs, ``2B`` rows ``[chosen; rejected]``; per-token tensors are ``[2B, T]`` (or ``[B, T]`` per
side), shifted so position t scores completion token t; masks are bool. All loss arithmetic is float32.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from genalign.objectives.base import Objective, ObjectiveParams

__all__ = ["masked_sum", "LMObjective", "LMLossOutput", "TokenForward", "LMParams"]


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` [B, T] over dim 1 where ``mask`` [B, T] is nonzero, in float32 → [B].

    Masked positions are zeroed with ``where`` (not multiplied), so a NaN/inf at a padded position cannot leak.
    """
    values = values.float()
    return torch.where(mask.bool(), values, torch.zeros_like(values)).sum(dim=1)


class LMParams(ObjectiveParams):
    """Fields every LM objective has: β (TRL's ``DPOConfig.beta`` is set from it so TRL logs the same value)."""

    beta: float = 0.1


@dataclass
class LMLossOutput:
    """Per-pair losses and what the trainer logs.

    Attributes:
        losses: [B] per-pair losses (the trainer minimises their mean).
        chosen_rewards, rejected_rewards: [B] implicit rewards (detached), logged as TRL's ``rewards/*``.
        metrics: extra [B] or scalar tensors logged under their key (detached by the trainer).
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class TokenForward(ABC):
    """What the TRL trainer computed (lazily) for one ``[chosen; rejected]`` batch; implemented by the trainer.

    Attributes:
        mask: [2B, T] bool completion mask (shifted). inputs: the collated batch (``token_rewards``, ``segment_ids``
            ... unshifted, ``[2B, L]``).
    """

    mask: torch.Tensor
    inputs: dict[str, Any]

    @abstractmethod
    def token_logps(self) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
        """``(policy [2B, T], reference [2B, T] or None, precomputed reference sums ([B], [B]) or None)``
        (implemented by the TRL trainer's forward, ``genalign.training.lm.trainers``)."""

    @abstractmethod
    def token_logps_and_kl(self, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(policy [2B, T], reference [2B, T], KL(π_ref‖π_θ) [B, T] on the chosen half)`` in one chunked pass
        (implemented by the TRL trainer's forward)."""

    def field(self, name: str) -> torch.Tensor:
        """A per-token side-information tensor of the batch, shifted like the log-probs: ``[2B, T]``.

        Raises:
            KeyError: the batch has no such field (message names it).
        """
        if name not in self.inputs:
            raise KeyError(f"the batch has no {name!r} field (the collator did not produce it)")
        return self.inputs[name][..., 1:]


class LMObjective(Objective):
    """Base of the LM objectives: declarations the LM trainer reads, plus :meth:`lm_loss`.

    Class attributes:
        family: ``"lm"`` — load_config pairs it with ``pipeline.name: language | video_language``.
        token_fields: per-token columns the collator places on the batch: ``{key: (chosen_col, rejected_col, pad)}``.
        online_reference: True if the reference must run at every step (no ``precompute_ref_log_probs``).
        video: True if the objective supports video-LM rows (the video collator).
    """

    Config: ClassVar[type[ObjectiveParams]] = LMParams
    family: ClassVar[str] = "lm"
    data_kind: ClassVar[str] = "token-pairs"
    data_sources: ClassVar[tuple[str, ...]] = ()
    needs_reference: ClassVar[bool] = True
    online_reference: ClassVar[bool] = False
    video: ClassVar[bool] = False

    def __init__(self, config: ObjectiveParams | None = None, model: Any = None):
        super().__init__(config if config is not None else self.Config(), model)

    @classmethod
    def from_params(cls, **params) -> "LMObjective":
        """Build with a validated ``Config(**params)`` (pydantic raises on unknown keys / bad values)."""
        return cls(cls.Config(**params))

    def token_fields(self) -> dict[str, tuple[str, str, Any]]:
        """Per-token columns for the collator (default none)."""
        return {}

    def extra_columns(self) -> list[str]:
        """Dataset columns TRL must keep for :meth:`prepare_dataset` / the collator (default: the token fields)."""
        return [c for ck, rk, _ in self.token_fields().values() for c in (ck, rk)]

    def collator_options(self) -> dict[str, Any]:
        """Options for the video collator (``segment_mode``, tags ...); default none."""
        return {}

    def prepare_rows(self, dataset, model, tokenizer) -> Any:
        """Add method-specific columns to the raw rows before TRL sees them (T-REG: token rewards from the frozen
        initial ``model``). Default: unchanged."""
        return dataset

    def prepare_dataset(self, dataset, processing_class, name: str, counts) -> Any:
        """Add per-token columns after TRL's tokenisation (``prompt_ids``/``chosen_ids``/``rejected_ids``).

        Args:
            dataset: ``datasets.Dataset``. processing_class: tokenizer/processor. name: "train" | "eval".
            counts: ``Counter`` to count dropped rows and statuses in.

        Returns:
            the dataset (default unchanged).
        """
        return dataset

    def lm_loss(self, fwd: TokenForward) -> LMLossOutput:
        """The objective's per-pair losses on one batch (subclasses implement it)."""
        raise NotImplementedError(f"{type(self).__name__} must implement lm_loss()")

    @staticmethod
    def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[2B, ...]`` → (chosen ``[B, ...]``, rejected ``[B, ...]``)."""
        return x.chunk(2, dim=0)

    def sequence_logps(self, fwd: TokenForward):
        """Summed completion log-probs ``(policy chosen, policy rejected, ref chosen, ref rejected)``, each [B], plus
        the per-token tensors ``(pc, pr, ref_c_tok, ref_r_tok, mc, mr)`` (reference per-token may be None)."""
        logps, ref_logps, ref_sums = fwd.token_logps()
        pc, pr = self.split(logps)
        mc, mr = self.split(fwd.mask)
        if ref_logps is not None:
            rc_tok, rr_tok = self.split(ref_logps)
            rc, rr = masked_sum(rc_tok, mc), masked_sum(rr_tok, mr)
        else:
            rc_tok = rr_tok = None
            rc, rr = ref_sums
        return (masked_sum(pc, mc), masked_sum(pr, mr), rc, rr), (pc, pr, rc_tok, rr_tok, mc, mr)
