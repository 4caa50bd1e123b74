"""Prompt sets: the digits demo's train / held-out prompts, PartiPrompts, and prompt files.

Spec strings: ``digits:train``, ``digits:heldout``, ``parti`` (all 1,632), ``parti:<Category>`` (e.g.
``parti:Animals``), or a path to ``.txt`` (one prompt per line), ``.tsv`` (column ``Prompt``) or ``.jsonl``
(field ``prompt``). PartiPrompts ships as package data (google-research/parti @ 5a65797, Apache-2.0; see
``genalign/assets/NOTICE``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def load_parti(category: str | None = None) -> list[str]:
    """PartiPrompts (1,632 prompts), optionally one ``Category``.

    Raises:
        ValueError: unknown category (the message lists the known ones).
    """
    with open(ASSETS / "PartiPrompts.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if category is None:
        return [r["Prompt"] for r in rows]
    cats = sorted({r["Category"] for r in rows})
    if category not in cats:
        raise ValueError(f"unknown PartiPrompts category {category!r}; known: {', '.join(cats)}")
    return [r["Prompt"] for r in rows if r["Category"] == category]


def load_prompts(spec: str, limit: int | None = None) -> list[str]:
    """Resolve a prompt-set spec (see module docstring) to a list of prompts (first ``limit`` if given).

    Raises:
        FileNotFoundError: a prompt file that does not exist.
        ValueError: an unknown ``digits:`` split, an empty set, or a jsonl row without ``prompt``.
    """
    if spec.startswith("digits:"):
        from genalign.data.digits import digits_prompts

        prompts = digits_prompts(spec.split(":", 1)[1])
    elif spec == "parti" or spec.startswith("parti:"):
        prompts = load_parti(spec.split(":", 1)[1] if ":" in spec else None)
    else:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(f"prompt file {spec!r} not found (or use digits:train, digits:heldout, parti)")
        if path.suffix == ".tsv":
            with open(path, newline="") as f:
                prompts = [r["Prompt"] for r in csv.DictReader(f, delimiter="\t")]
        elif path.suffix == ".jsonl":
            prompts = []
            for i, line in enumerate(path.read_text().splitlines()):
                if line.strip():
                    row = json.loads(line)
                    if "prompt" not in row:
                        raise ValueError(f"{spec}: line {i + 1} has no 'prompt' field")
                    prompts.append(row["prompt"])
        else:
            prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not prompts:
        raise ValueError(f"prompt set {spec!r} is empty")
    return prompts[:limit] if limit else prompts
