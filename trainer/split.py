"""Seeded train/validation splits and federated shards of row indices (torch-free)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from trainer.errors import DatasetError

if TYPE_CHECKING:
    from trainer.table import Table

STRATEGIES = ("iid", "label_skew")
# The share of rows held out to validate on, wherever the platform splits a dataset.
VALIDATION_FRACTION = 0.2
_SKEW_ATTEMPTS = 20  # Dirichlet redraws before empty shards are topped up by hand


def _is_classes(y: np.ndarray) -> bool:
    return np.issubdtype(y.dtype, np.integer)


def _check_fraction(validation_fraction: float) -> None:
    if not (math.isfinite(validation_fraction) and 0.0 <= validation_fraction < 1.0):
        raise DatasetError(
            f"the validation fraction must be at least 0 and below 1; got {validation_fraction}"
        )


def _too_few(rows: int, validation_fraction: float, stratified: bool) -> DatasetError:
    need = "at least one class with 2 rows" if stratified else "at least 2 rows"
    return DatasetError(
        f"too few rows to hold out {validation_fraction:.0%} for validation: the dataset has "
        f"{rows} row{'s' if rows != 1 else ''} and a split needs {need} (one row to train on, "
        "one to validate); add rows or set the validation fraction to 0"
    )


def _class_quotas(counts: np.ndarray, wanted: int) -> np.ndarray:
    """Validation rows per class: proportional (largest remainders), keeping >= 1 training row per class."""
    exact = counts * (wanted / counts.sum())
    caps = counts - 1
    quotas = np.minimum(np.floor(exact).astype(np.int64), caps)
    # hand out the rows still wanted by largest remainder, to classes with room left
    for c in np.argsort(-(exact - np.floor(exact)), kind="stable"):
        if quotas.sum() >= wanted:
            break
        if quotas[c] < caps[c]:
            quotas[c] += 1
    return quotas


def split_indices(
    y: np.ndarray, validation_fraction: float = 0.2, seed: int = 0, stratify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) sorted row indices; stratified by class when y holds class indices."""
    y = np.asarray(y)
    _check_fraction(validation_fraction)
    rows = len(y)
    if rows == 0:
        raise DatasetError("the dataset has no rows")
    if validation_fraction == 0.0:
        return np.arange(rows, dtype=np.int64), np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    wanted = max(1, round(rows * validation_fraction))
    stratified = stratify and _is_classes(y)
    if stratified:
        labels, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
        quotas = _class_quotas(counts, wanted)
        if quotas.sum() == 0:
            raise _too_few(rows, validation_fraction, stratified)
        chosen = [rng.permutation(np.flatnonzero(inverse == c))[:quota] for c, quota in enumerate(quotas)]
        validation = np.concatenate(chosen)
    else:
        if rows < 2:
            raise _too_few(rows, validation_fraction, stratified)
        validation = rng.permutation(rows)[: min(wanted, rows - 1)]
    mask = np.zeros(rows, dtype=bool)
    mask[validation] = True
    return np.flatnonzero(~mask).astype(np.int64), np.flatnonzero(mask).astype(np.int64)


def check_splittable(
    data: Table | np.ndarray, validation_fraction: float = 0.2, stratify: bool = True
) -> None:
    """Raise DatasetError if a table (or its y) has too few rows for a split with this validation fraction."""
    split_indices(getattr(data, "y", data), validation_fraction, seed=0, stratify=stratify)


def shard(
    indices: np.ndarray, y: np.ndarray, n: int, strategy: str = "iid", alpha: float = 0.5, seed: int = 0
) -> list[np.ndarray]:
    """Split row `indices` (e.g. the training rows) into `n` disjoint, non-empty, sorted covering shards."""
    # `y` holds the labels of all rows (indexed by `indices`). label_skew draws each class's share per shard
    # from Dirichlet(alpha): alpha 0.1 gives shards dominated by a few classes, alpha 100 nearly iid ones.
    indices = np.asarray(indices, dtype=np.int64)
    y = np.asarray(y)
    if strategy not in STRATEGIES:
        raise DatasetError(f"shard strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if n < 1:
        raise DatasetError(f"the number of shards must be at least 1; got {n}")
    if len(np.unique(indices)) != len(indices):
        raise DatasetError("shard indices must not repeat a row")
    if len(indices) < n:
        raise DatasetError(
            f"cannot make {n} shards from {len(indices)} training rows: every peer needs at "
            "least one row; use fewer peers or more data"
        )
    rng = np.random.default_rng(seed)
    if strategy == "iid":
        parts = np.array_split(rng.permutation(indices), n)
    else:
        if not _is_classes(y):
            raise DatasetError("label_skew sharding needs class labels: use 'iid' for regression")
        if not (math.isfinite(alpha) and alpha > 0):
            raise DatasetError(f"the Dirichlet alpha must be a positive number; got {alpha}")
        parts = _label_skew(indices, y[indices], n, alpha, rng)
    return [np.sort(part) for part in parts]


def _label_skew(
    indices: np.ndarray, labels: np.ndarray, n: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per class, cut its (shuffled) rows across the n shards in Dirichlet(alpha) proportions."""
    parts: list[np.ndarray] = []
    for _ in range(_SKEW_ATTEMPTS):
        buckets: list[list[np.ndarray]] = [[] for _ in range(n)]
        for label in np.unique(labels):
            members = rng.permutation(indices[labels == label])
            shares = rng.dirichlet(np.full(n, alpha))
            cuts = np.floor(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for bucket, piece in zip(buckets, np.split(members, cuts), strict=True):
                bucket.append(piece)
        parts = [np.concatenate(bucket) for bucket in buckets]
        if all(len(part) for part in parts):
            return parts
    # still an empty shard: move one row into it from the largest shard (there are >= n rows in all)
    for i in range(n):
        if len(parts[i]) == 0:
            donor = max(range(n), key=lambda j: len(parts[j]))
            parts[i], parts[donor] = parts[donor][-1:], parts[donor][:-1]
    return parts
