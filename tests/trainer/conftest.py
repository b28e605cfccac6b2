"""Datasets for the trainer tests: scikit-learn's bundled ones and small hand-written CSVs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from harness.datasets import blobs_csv, sklearn_csv


@pytest.fixture(scope="session")
def csv_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trainer-data")


@pytest.fixture(scope="session")
def digits_csv(csv_dir: Path) -> Path:
    return sklearn_csv(csv_dir / "digits.csv", "digits")


@pytest.fixture(scope="session")
def breast_cancer_csv(csv_dir: Path) -> Path:
    return sklearn_csv(csv_dir / "breast_cancer.csv", "breast_cancer")


@pytest.fixture(scope="session")
def diabetes_csv(csv_dir: Path) -> Path:
    return sklearn_csv(csv_dir / "diabetes.csv", "diabetes")


@pytest.fixture(scope="session")
def blobs(csv_dir: Path) -> Path:
    """200 rows, 4 features, 2 separable classes."""
    return blobs_csv(csv_dir / "blobs.csv", rows=200, features=4, classes=2)


@pytest.fixture
def write(tmp_path: Path) -> Callable[..., Path]:
    """Write CSV text (or bytes) exactly as given, newlines included, and return its path."""

    def make(content: str | bytes, name: str = "data.csv") -> Path:
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return path

    return make
