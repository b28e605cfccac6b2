"""Predictions from a saved model: applies the stored normalisation and maps outputs back to labels."""

from __future__ import annotations

import os
from typing import Any, BinaryIO

import numpy as np
import torch

from trainer.csvfile import Source
from trainer.model import SimpleDNN
from trainer.table import Table, read_features
from trainer.weights import Checkpoint, load_checkpoint

_BATCH = 8192  # rows per forward pass


class Predictor:
    """A trained model with its checkpoint: features in (by name), labels or values out."""

    def __init__(self, model: SimpleDNN, checkpoint: Checkpoint) -> None:
        self.model = model.eval()
        self.checkpoint = checkpoint

    @classmethod
    def load(cls, source: str | os.PathLike[str] | bytes | BinaryIO) -> Predictor:
        """From a checkpoint file, bytes or binary file object."""
        return cls(*load_checkpoint(source))

    @torch.inference_mode()
    def outputs(self, x: np.ndarray) -> np.ndarray:
        """Model outputs [rows, output_size] for raw (not yet normalised) features x [rows, n_features]."""
        inputs = torch.from_numpy(self.checkpoint.normalization.apply(x))
        device = next(self.model.parameters()).device
        chunks = [self.model(part.to(device)).cpu() for part in inputs.split(_BATCH)]
        if not chunks:
            return np.empty((0, self.checkpoint.config.output_size), dtype=np.float32)
        return torch.cat(chunks).numpy()

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities [rows, classes] (classification only)."""
        if self.checkpoint.classes is None:
            raise ValueError("probabilities exist only for classification models")
        return torch.softmax(torch.from_numpy(self.outputs(x)), dim=1).numpy()

    def predict(self, x: np.ndarray) -> list[Any]:
        """One prediction per row: a class label (str) or a value in the target's units (float)."""
        out = self.outputs(x)
        if self.checkpoint.classes is not None:
            return [self.checkpoint.classes[i] for i in out.argmax(axis=1)]
        return [float(v) for v in self.checkpoint.normalization.restore_target(out[:, 0])]

    def predict_table(self, table: Table) -> list[Any]:
        """Predictions for a table read with the checkpoint's features (in any column order)."""
        order = [table.features.index(name) for name in self.checkpoint.features]
        return self.predict(table.x[:, order])

    def predict_csv(self, source: Source) -> list[Any]:
        """Predictions for each row of a CSV holding (at least) the checkpoint's feature columns."""
        return self.predict(read_features(source, self.checkpoint.features))
