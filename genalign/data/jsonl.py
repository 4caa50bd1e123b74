"""Reading a jsonl file of rows where a bad row is a counted skip, never a crash (text and video preference data)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any, Callable

from genalign.config import ConfigError

logger = logging.getLogger(__name__)


def read_checked_jsonl(path: str, problem: Callable[[Any], str | None], counts: Counter,
                       max_lines: int | None = None, log_skips: bool = True) -> list[dict]:
    """The rows of ``path`` that ``problem(row)`` accepts (returns None; it may normalise the row in place).

    Lines that are not JSON count as ``bad_rows/not_json``; rows ``problem`` rejects count as
    ``bad_rows/<reason>``; each skip is logged with its line number unless ``log_skips`` is False (the pre-flight
    look, which reports the counts itself, so the trainer's read does not log every row twice). Blank lines are
    ignored. ``max_lines``: stop after that many non-blank lines (a pre-flight look at the head of a large file).

    Raises:
        ConfigError: the file cannot be read (one line naming it).
    """
    rows = []
    try:
        f = open(path)
    except OSError as err:
        raise ConfigError(f"data: {path}: cannot read ({err.strerror or err})") from None
    seen = 0
    with f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if max_lines is not None and seen >= max_lines:
                break
            seen += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row, why = None, "not_json"
            else:
                why = problem(row)
            if why:
                counts[f"bad_rows/{why}"] += 1
                if log_skips:
                    logger.warning("%s:%d: skipped (%s)", path, n, why)
                continue
            rows.append(row)
    return rows


def text_row_problem(row) -> str | None:
    """Why a text preference row cannot be used (None if it can): TRL needs prompt/chosen/rejected as strings (or
    message lists for conversational data)."""
    if not isinstance(row, dict):
        return "not_an_object"
    missing = {"prompt", "chosen", "rejected"} - set(row)
    if missing:
        return "missing_" + "_".join(sorted(missing))
    kinds = {type(row[k]) for k in ("prompt", "chosen", "rejected")}
    if not (kinds == {str} or kinds == {list}):
        return "prompt_chosen_rejected_not_all_strings_or_all_message_lists"
    if row["chosen"] == row["rejected"]:
        return "identical_chosen_rejected"
    return None
