"""Exceptions shared across layers (a leaf module: it imports nothing from genalign)."""

from __future__ import annotations


class WeightsNotFoundError(FileNotFoundError):
    """A model or reward checkpoint is not available locally and cannot be downloaded.

    The message names the missing file / hub id and says how to provide it (a local path, or network access).
    """
