"""Building blocks of every config section: strict models, integer and seed types, the one-line ConfigError."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _not_bool(v: Any) -> Any:
    """YAML ``true`` is not a count: refuse booleans where an integer is expected (pydantic would read True as 1)."""
    if isinstance(v, bool):
        raise ValueError("expected an integer, got a boolean")
    return v


Int = Annotated[int, BeforeValidator(_not_bool)]
Seed = Annotated[int, BeforeValidator(_not_bool), Field(ge=0, lt=2**32, description="random seed in [0, 2**32)")]


class ConfigError(ValueError):
    """A config file or override is invalid; the message is one line: ``file: key: value: reason``."""


class Strict(BaseModel):
    """Base for every section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def yaml_no_as_string(v: Any) -> Any:
    """YAML 1.1 reads a bare ``no`` as False; mean the string "no"."""
    return "no" if v is False else v
