"""Synthetic preference pairs for smoke runs and tests: ``"a+b="`` → the correct sum vs one digit changed."""

from __future__ import annotations

import random

__all__ = ["make_arithmetic_preference_rows"]


def make_arithmetic_preference_rows(n: int, seed: int = 0, max_operand: int = 99, exclude: set | None = None,
                                    tagged: bool = False) -> list[dict]:
    """Synthetic preference pairs ``"a+b="`` → correct sum vs the sum with one digit changed.

    Args:
        n: number of rows. seed: RNG seed. max_operand: operands in [0, max_operand].
        exclude: ``(a, b)`` problems to skip (keep held-out problems out of training).
        tagged: also emit ``chosen_masked`` / ``rejected_masked`` with the differing digit in ``<MASK>…</MASK>``.

    Returns:
        list of ``{"prompt", "chosen", "rejected", "a", "b"}`` dicts (+ tagged columns).
    """
    rng = random.Random(seed)
    rows, seen = [], set(exclude or ())
    while len(rows) < n:
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        good = str(a + b)
        pos = rng.randrange(len(good))
        choices = [d for d in "0123456789" if d != good[pos] and not (pos == 0 and d == "0" and len(good) > 1)]
        bad = good[:pos] + rng.choice(choices) + good[pos + 1:]
        row = {"prompt": f"{a}+{b}=", "chosen": good, "rejected": bad, "a": a, "b": b}
        if tagged:
            row["chosen_masked"] = good[:pos] + "<MASK>" + good[pos] + "</MASK>" + good[pos + 1:]
            row["rejected_masked"] = bad[:pos] + "<MASK>" + bad[pos] + "</MASK>" + bad[pos + 1:]
        rows.append(row)
    return rows
