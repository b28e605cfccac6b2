"""A table split into normalised training and validation arrays, ready to train on (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.normalization import Normalization, fit_normalization
from trainer.split import split_indices
from trainer.table import Table


@dataclass
class Dataset:
    """Normalised train/validation arrays of a table, with the statistics used (fit on training rows only)."""

    table: Table
    train_index: np.ndarray  # [train_rows] row numbers into the table
    val_index: np.ndarray  # [val_rows]
    normalization: Normalization
    train_x: np.ndarray  # [train_rows, n_features] float32
    train_y: np.ndarray  # [train_rows] int64 classes, or float32 standardised regression target
    val_x: np.ndarray
    val_y: np.ndarray

    @classmethod
    def from_indices(
        cls,
        table: Table,
        train_index: np.ndarray,
        val_index: np.ndarray | None = None,
        normalization: Normalization | None = None,
    ) -> Dataset:
        """Select rows (e.g. a peer's shard) and normalise them; statistics are fit on them unless given."""
        train_index = np.asarray(train_index, dtype=np.int64)
        val_index = (
            np.empty(0, dtype=np.int64) if val_index is None else np.asarray(val_index, dtype=np.int64)
        )
        if normalization is None:
            target = table.y[train_index] if table.task == "regression" else None
            normalization = fit_normalization(table.x[train_index], target)
        return cls(
            table=table,
            train_index=train_index,
            val_index=val_index,
            normalization=normalization,
            train_x=normalization.apply(table.x[train_index]),
            train_y=_target(table, normalization, train_index),
            val_x=normalization.apply(table.x[val_index]),
            val_y=_target(table, normalization, val_index),
        )


def _target(table: Table, normalization: Normalization, index: np.ndarray) -> np.ndarray:
    y = table.y[index]
    return normalization.apply_target(y) if table.task == "regression" else y


def prepare(table: Table, validation_fraction: float = 0.2, seed: int = 0, stratify: bool = True) -> Dataset:
    """Seeded (stratified) split of `table`, normalised with statistics of its training rows."""
    train_index, val_index = split_indices(table.y, validation_fraction, seed, stratify)
    return Dataset.from_indices(table, train_index, val_index)
