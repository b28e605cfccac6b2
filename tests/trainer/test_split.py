"""Splits, federated shards and normalisation statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainer.dataset import Dataset, prepare
from trainer.table import (
    DatasetError,
    Normalization,
    check_splittable,
    fit_normalization,
    read_table,
    shard,
    split_indices,
)

LABELS = np.repeat(np.arange(10), [100, 90, 80, 70, 60, 50, 40, 30, 20, 10])  # 550 rows, unbalanced


def test_split_is_stratified_disjoint_and_complete():
    train, val = split_indices(LABELS, 0.2, seed=1)
    assert len(val) == 110 and len(train) == 440
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(LABELS)))
    # each class keeps its share in the validation part
    assert np.bincount(LABELS[val], minlength=10).tolist() == [20, 18, 16, 14, 12, 10, 8, 6, 4, 2]


def test_split_is_seeded():
    assert np.array_equal(split_indices(LABELS, 0.2, seed=3)[1], split_indices(LABELS, 0.2, seed=3)[1])
    assert not np.array_equal(split_indices(LABELS, 0.2, seed=3)[1], split_indices(LABELS, 0.2, seed=4)[1])


def test_split_keeps_every_class_in_training():
    y = np.array([0, 0, 1, 2, 2, 2])
    train, val = split_indices(y, 0.5)
    assert set(y[train].tolist()) == {0, 1, 2} and len(val) == 3


def test_zero_validation_fraction_trains_on_everything():
    train, val = split_indices(LABELS, 0.0)
    assert len(train) == len(LABELS) and len(val) == 0


def test_regression_split_is_random():
    train, val = split_indices(np.linspace(0, 1, 50, dtype=np.float32), 0.2)
    assert len(val) == 10 and len(np.intersect1d(train, val)) == 0


def test_too_few_rows_to_split_is_a_dataset_error():
    with pytest.raises(
        DatasetError, match=r"too few rows to hold out 20% for validation: the dataset has 2 rows"
    ):
        check_splittable(np.array([0, 1]), 0.2)
    check_splittable(np.array([0, 1]), 0.0)
    check_splittable(read_table(b"a,label\n1,0\n2,1\n3,0\n4,1\n"), 0.5)  # a table works too


@pytest.mark.parametrize("fraction", [-0.1, 1.0, float("nan")])
def test_validation_fraction_must_be_below_one(fraction):
    with pytest.raises(DatasetError, match="validation fraction"):
        split_indices(LABELS, fraction)


def _coverage_ok(parts: list[np.ndarray], rows: np.ndarray) -> bool:
    joined = np.concatenate(parts)
    return (
        len(joined) == len(rows) and set(joined.tolist()) == set(rows.tolist()) and all(len(p) for p in parts)
    )


def _skew(parts: list[np.ndarray], y: np.ndarray) -> float:
    """Mean total-variation distance between each shard's label mix and the whole's."""
    whole = np.bincount(y[np.concatenate(parts)], minlength=10) / sum(len(p) for p in parts)
    return float(
        np.mean([0.5 * np.abs(np.bincount(y[p], minlength=10) / len(p) - whole).sum() for p in parts])
    )


@pytest.mark.parametrize("strategy", ["iid", "label_skew"])
def test_shards_are_disjoint_and_cover_the_training_rows(strategy):
    train, _ = split_indices(LABELS, 0.2)
    parts = shard(train, LABELS, 5, strategy, alpha=0.5, seed=0)
    assert len(parts) == 5 and _coverage_ok(parts, train)
    assert all(np.all(np.diff(p) > 0) for p in parts)


def test_iid_shards_are_balanced():
    sizes = [len(p) for p in shard(np.arange(103), LABELS, 4)]
    assert sorted(sizes) == [25, 26, 26, 26]


def test_label_skew_is_measurably_skewed():
    train, _ = split_indices(LABELS, 0.2)
    iid = _skew(shard(train, LABELS, 5, "iid", seed=0), LABELS)
    skewed = _skew(shard(train, LABELS, 5, "label_skew", alpha=0.1, seed=0), LABELS)
    near_iid = _skew(shard(train, LABELS, 5, "label_skew", alpha=1000.0, seed=0), LABELS)
    assert iid < 0.2 and near_iid < 0.2 and skewed > 0.45


def test_label_skew_never_leaves_a_shard_empty():
    y = np.array([0] * 10 + [1] * 10)
    for seed in range(20):
        assert _coverage_ok(shard(np.arange(20), y, 10, "label_skew", alpha=0.01, seed=seed), np.arange(20))


def test_shards_are_seeded():
    a = shard(np.arange(100), LABELS, 3, "label_skew", seed=7)
    b = shard(np.arange(100), LABELS, 3, "label_skew", seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_more_shards_than_rows_is_a_dataset_error():
    with pytest.raises(DatasetError, match="cannot make 5 shards from 3 training rows"):
        shard(np.arange(3), LABELS, 5)


def test_label_skew_needs_classes():
    with pytest.raises(DatasetError, match="use 'iid' for regression"):
        shard(np.arange(10), np.linspace(0, 1, 10), 2, "label_skew")


def test_normalization_uses_the_given_rows_and_survives_json():
    x = np.array([[1, 5, 10], [3, 5, 20]], dtype=np.float32)
    stats = fit_normalization(x)
    assert stats.mean == [2.0, 5.0, 15.0] and stats.std == [1.0, 1.0, 5.0]  # constant column: std 1
    again = Normalization.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert again == stats
    assert again.apply(x).tolist() == [[-1, 0, -1], [1, 0, 1]]


def test_normalization_refuses_the_wrong_width():
    with pytest.raises(DatasetError, match="expected rows of 3 features"):
        fit_normalization(np.ones((2, 3))).apply(np.ones((2, 4)))


def test_prepare_fits_statistics_on_training_rows_only(blobs):
    table = read_table(blobs)
    data = prepare(table, 0.25, seed=0)
    assert np.allclose(data.normalization.mean, table.x[data.train_index].mean(axis=0), atol=1e-5)
    assert not np.allclose(data.normalization.mean, table.x.mean(axis=0), atol=1e-5)
    assert np.allclose(data.train_x.mean(axis=0), 0, atol=1e-5)
    assert len(data.val_x) == 50 and data.train_y.dtype == np.int64


def test_regression_targets_are_standardised(diabetes_csv):
    table = read_table(diabetes_csv, task="regression")
    data = Dataset.from_indices(table, np.arange(300), np.arange(300, 442))
    assert data.normalization.target_mean == pytest.approx(float(table.y[:300].mean()), rel=1e-5)
    assert abs(float(data.train_y.mean())) < 1e-5 and float(data.train_y.std()) == pytest.approx(
        1.0, rel=1e-4
    )
