"""Feature (and regression target) standardisation, as plain numbers that travel as JSON (torch-free)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from trainer.errors import DatasetError


def _scale(std: np.ndarray, mean: np.ndarray) -> np.ndarray:
    # A constant column has std 0 (or float noise around it): dividing by 1 leaves it centred at 0.
    return np.where(std <= 1e-7 * np.maximum(np.abs(mean), 1.0), 1.0, std)


@dataclass(frozen=True)
class Normalization:
    """Per-feature mean/std from the training rows; target mean/std too for regression."""

    mean: list[float]
    std: list[float]
    target_mean: float | None = None
    target_std: float | None = None

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise DatasetError(
                f"normalization needs one mean and one std per feature; got {len(self.mean)} "
                f"means and {len(self.std)} stds"
            )
        numbers = [*self.mean, *self.std]
        if (self.target_mean is None) != (self.target_std is None):
            raise DatasetError("normalization needs both a target mean and a target std, or neither")
        if self.target_mean is not None:
            numbers += [self.target_mean, self.target_std]
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in numbers):
            raise DatasetError("normalization statistics must be finite numbers")
        if min(self.std) <= 0 or (self.target_std is not None and self.target_std <= 0):
            raise DatasetError("normalization standard deviations must be positive")

    @property
    def size(self) -> int:
        """Number of features."""
        return len(self.mean)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(x - mean) / std as float32 [rows, n_features]."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.size:
            raise DatasetError(f"expected rows of {self.size} features, got an array of shape {x.shape}")
        out = np.subtract(x, np.asarray(self.mean, dtype=np.float32), dtype=np.float32)
        out /= np.asarray(self.std, dtype=np.float32)
        return out

    def apply_target(self, y: np.ndarray) -> np.ndarray:
        """Standardised regression target [rows] float32 (unchanged when there are no target statistics)."""
        y = np.asarray(y, dtype=np.float32)
        if self.target_mean is None or self.target_std is None:
            return y
        return (y - np.float32(self.target_mean)) / np.float32(self.target_std)

    def restore_target(self, y: np.ndarray) -> np.ndarray:
        """Model outputs back in the target's own units (float64)."""
        y = np.asarray(y, dtype=np.float64)
        if self.target_mean is None or self.target_std is None:
            return y
        return y * self.target_std + self.target_mean

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Normalization:
        """Rebuild from `to_dict()` output."""
        try:
            return cls(
                mean=[float(v) for v in data["mean"]],
                std=[float(v) for v in data["std"]],
                target_mean=None if data.get("target_mean") is None else float(data["target_mean"]),
                target_std=None if data.get("target_std") is None else float(data["target_std"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise DatasetError(f"invalid normalization statistics: {error}") from error


def _moments(x: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and std of x [rows, n] in float64, a block of rows at a time (no full float64 copy)."""
    rows = x.shape[0]
    total = np.zeros(x.shape[1:], dtype=np.float64)
    for start in range(0, rows, chunk):
        total += x[start : start + chunk].sum(axis=0, dtype=np.float64)
    mean = total / rows
    squares = np.zeros_like(mean)
    for start in range(0, rows, chunk):
        deviation = x[start : start + chunk].astype(np.float64) - mean
        squares += np.einsum("ij,ij->j", deviation, deviation)
    return mean, np.sqrt(squares / rows)


def fit_normalization(x: np.ndarray, y: np.ndarray | None = None) -> Normalization:
    """Statistics of training rows x [rows, n_features] (and a regression target y [rows], if given)."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise DatasetError(f"normalization needs at least one training row of features; got shape {x.shape}")
    mean, std = _moments(x)
    target_mean = target_std = None
    if y is not None:
        y_mean, y_std = _moments(np.asarray(y).reshape(-1, 1))
        target_mean = float(y_mean[0])
        target_std = float(_scale(y_std, y_mean)[0])
    return Normalization(
        mean=mean.tolist(), std=_scale(std, mean).tolist(), target_mean=target_mean, target_std=target_std
    )
