"""TRL's preference collator plus per-token side information (T-REG token rewards, RRPO segment ids)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference

__all__ = ["TokenFieldCollator"]


@dataclass
class TokenFieldCollator(DataCollatorForPreference):
    """TRL 1.16 ``DataCollatorForPreference`` that also places per-token columns on the ``[chosen; rejected]`` layout.

    ``token_fields`` maps an output key to ``(chosen_column, rejected_column, pad_value)``; each column holds one
    value per completion token (same length as ``chosen_ids`` / ``rejected_ids``). The output tensor is ``[2B, L]``
    with the values on the completion positions, ``pad_value`` on prompt and padding positions, truncated exactly
    like ``input_ids``. It is **not** shifted: the trainer applies ``[:, 1:]`` to align with TRL's log-probs.

    Raises:
        ValueError: a row whose value count differs from its completion length (message names the row).
    """

    token_fields: dict = field(default_factory=dict)

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().torch_call(examples)
        width = out["input_ids"].shape[1]
        for key, (ck, rk, pad_value) in self.token_fields.items():
            rows = []
            for col, ids_key in ((ck, "chosen_ids"), (rk, "rejected_ids")):
                for i, ex in enumerate(examples):
                    vals = list(ex[col])
                    if len(vals) != len(ex[ids_key]):
                        raise ValueError(
                            f"row {ex.get('row_id', i)}: {col!r} has {len(vals)} values but the completion has "
                            f"{len(ex[ids_key])} tokens; side information must be computed on the trainer's tokens"
                        )
                    rows.append([pad_value] * len(ex["prompt_ids"]) + vals)
            if self.max_length is not None:
                sl = slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None)
                rows = [r[sl] for r in rows]
            dtype = torch.float32 if isinstance(pad_value, float) else torch.long
            t = torch.full((len(rows), width), pad_value, dtype=dtype)
            for j, r in enumerate(rows):
                t[j, : len(r)] = torch.tensor(r, dtype=dtype)
            out[key] = t
        return out
