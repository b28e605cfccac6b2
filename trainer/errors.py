"""The error a user sees when their dataset or settings cannot be used (torch-free)."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset that cannot be trained on; the message says what is wrong and where."""
