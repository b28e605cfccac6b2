"""Datasets for tests, written out as CSV files: scikit-learn's bundled ones, or small generated ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_csv(path: Path, x: np.ndarray, y: np.ndarray, feature_names: list[str] | None = None,
              target: str = "label") -> Path:
    """Write features and target as a CSV with a header row."""
    names = feature_names or [f"f{i}" for i in range(x.shape[1])]
    with path.open("w") as f:
        f.write(",".join([*names, target]) + "\n")
        for row, label in zip(x, y, strict=True):
            f.write(",".join(f"{v:g}" for v in row) + f",{label}\n")
    return path


def sklearn_csv(path: Path, name: str) -> Path:
    """One of scikit-learn's bundled datasets (`digits`, `breast_cancer`, `wine`, `diabetes`) as CSV."""
    from sklearn import datasets

    data = getattr(datasets, f"load_{name}")()
    names = [str(n).replace(" ", "_") for n in data.feature_names]
    return write_csv(path, data.data, data.target, names)


def blobs_csv(path: Path, rows: int = 200, features: int = 4, classes: int = 2, seed: int = 0) -> Path:
    """Separable Gaussian blobs: a small dataset any model learns in a few epochs."""
    rng = np.random.default_rng(seed)
    y = np.arange(rows) % classes
    centers = rng.normal(0, 4, size=(classes, features))
    x = centers[y] + rng.normal(0, 1, size=(rows, features))
    return write_csv(path, x, y)


def tabular_csv(path: Path, rows: int = 20_000, features: int = 40, classes: int = 7, seed: int = 0) -> Path:
    """The tabular job the round benches train: scikit-learn's make_classification, 40 features, 7 classes."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=rows, n_features=features, n_informative=24, n_redundant=8,
                               n_classes=classes, n_clusters_per_class=1, random_state=seed)
    return write_csv(path, x.round(4), y)
