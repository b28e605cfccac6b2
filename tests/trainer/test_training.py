"""The model and the training loop on real data: accuracy, determinism, callbacks, cancellation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trainer.dataset import Dataset, prepare
from trainer.loop import EpochMetrics, TrainConfig, TrainingError, evaluate, train
from trainer.model import ModelConfig, SimpleDNN
from trainer.table import read_table
from trainer.weights import WeightsError

TIMING = {"samples_per_sec", "seconds", "finished_at"}


def _fit(data: Dataset, hidden=(64,), epochs=20, batch_size=32, seed=0, **options):
    table = data.table
    model = SimpleDNN(ModelConfig(len(table.features), table.output_size, hidden, task=table.task), seed=seed)
    config = TrainConfig(batch_size=batch_size, epochs=epochs, seed=seed, num_threads=1)
    return train(model, data.train_x, data.train_y, config, data.val_x, data.val_y, **options)


@pytest.fixture(scope="module")
def digits(digits_csv) -> Dataset:
    return prepare(read_table(digits_csv), 0.2, seed=0)


@pytest.fixture(scope="module")
def blobs_data(blobs) -> Dataset:
    return prepare(read_table(blobs), 0.2, seed=0)


def test_model_shapes_follow_the_config():
    config = ModelConfig(input_size=7, output_size=3, hidden=(5, 4), dropout=0.1)
    model = SimpleDNN(config)
    assert model(torch.zeros(2, 7)).shape == (2, 3)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == config.parameter_shapes()
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_model_init_is_seeded_and_leaves_the_global_generator_alone():
    config = ModelConfig(4, 2, (8,))
    before = torch.get_rng_state()
    a, b, c = SimpleDNN(config, seed=1), SimpleDNN(config, seed=1), SimpleDNN(config, seed=2)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a.layers[0].weight, b.layers[0].weight)
    assert not torch.equal(a.layers[0].weight, c.layers[0].weight)


@pytest.mark.parametrize(
    "bad", [dict(hidden=(0,)), dict(dropout=1.0), dict(task="ranking"), dict(output_size=1)]
)
def test_model_config_refuses_nonsense(bad):
    with pytest.raises(ValueError):
        ModelConfig(**{"input_size": 3, "output_size": 2, **bad})


def test_digits_reach_95_percent(digits):
    result = _fit(digits)
    assert result.history[-1].val_accuracy >= 0.95
    assert len(result.history) == 20 and not result.stopped and result.samples == 20 * len(digits.train_x)


def test_breast_cancer_reaches_95_percent(breast_cancer_csv):
    result = _fit(prepare(read_table(breast_cancer_csv), 0.2, seed=0), hidden=(32,))
    assert result.history[-1].val_accuracy >= 0.95


def test_diabetes_regression_beats_predicting_the_mean(diabetes_csv):
    data = prepare(read_table(diabetes_csv, task="regression"), 0.2, seed=0)
    result = _fit(data, hidden=(32,), epochs=30)
    last = result.history[-1]
    assert last.accuracy is None and last.val_accuracy is None
    assert last.val_r2 > 0.3  # predicting the mean scores 0


def test_same_seed_same_history_bit_for_bit(blobs_data):
    runs = [_fit(blobs_data, epochs=3) for _ in range(2)]
    first, second = (
        [{k: v for k, v in m.to_dict().items() if k not in TIMING} for m in r.history] for r in runs
    )
    assert first == second
    for key, value in runs[0].model.state_dict().items():
        assert torch.equal(value, runs[1].model.state_dict()[key])
    other = _fit(blobs_data, epochs=3, seed=1)
    assert other.history[0].loss != runs[0].history[0].loss


def test_dropout_runs_are_reproducible_too(blobs_data):
    def run():
        table = blobs_data.table
        model = SimpleDNN(ModelConfig(len(table.features), 2, (16,), dropout=0.5))
        return train(
            model, blobs_data.train_x, blobs_data.train_y, TrainConfig(epochs=2, num_threads=1)
        ).history

    assert [m.loss for m in run()] == [m.loss for m in run()]


def test_on_epoch_end_gets_json_safe_metrics(blobs_data):
    seen: list[EpochMetrics] = []
    _fit(blobs_data, epochs=3, on_epoch_end=seen.append)
    assert [m.epoch for m in seen] == [1, 2, 3] and all(m.epochs == 3 for m in seen)
    record = json.loads(json.dumps(seen[-1].to_dict(), allow_nan=False))
    assert set(record) >= {
        "epoch",
        "epochs",
        "loss",
        "accuracy",
        "val_loss",
        "val_accuracy",
        "val_r2",
        "samples_per_sec",
        "seconds",
    }
    assert 0 <= record["accuracy"] <= 1 and record["samples_per_sec"] > 0 and record["val_r2"] is None


def test_should_stop_ends_training_between_batches(blobs_data):
    calls = 0

    def stop() -> bool:
        nonlocal calls
        calls += 1
        return calls > 7  # 160 rows / batch 32 = 5 batches per epoch: stop during the second epoch

    result = _fit(blobs_data, epochs=50, should_stop=stop)
    assert result.stopped and len(result.history) == 1 and calls == 8
    assert result.samples == 7 * 32


def test_initial_state_is_used(digits):
    trained = _fit(digits, epochs=10)
    table = digits.table
    fresh = SimpleDNN(ModelConfig(len(table.features), table.output_size, (64,)), seed=5)
    config = TrainConfig(epochs=1, learning_rate=1e-9, num_threads=1)  # too small a step to learn anything
    resumed = train(
        fresh,
        digits.train_x,
        digits.train_y,
        config,
        digits.val_x,
        digits.val_y,
        initial_state=trained.model.state_dict(),
    )
    assert resumed.history[0].val_accuracy == pytest.approx(trained.history[-1].val_accuracy)


def test_initial_state_of_another_shape_is_refused(blobs_data):
    other = SimpleDNN(ModelConfig(4, 2, (8,))).state_dict()
    with pytest.raises(WeightsError, match=r"layers.0.weight has shape \[8, 4\]; this model needs \[64, 4\]"):
        _fit(blobs_data, epochs=1, initial_state=other)


def test_tensors_and_arrays_train_alike(blobs_data):
    table = blobs_data.table

    def run(x, y):
        model = SimpleDNN(ModelConfig(len(table.features), 2, (8,)))
        return train(model, x, y, TrainConfig(epochs=2, num_threads=1)).history[-1].loss

    assert run(blobs_data.train_x, blobs_data.train_y) == run(
        torch.from_numpy(blobs_data.train_x), torch.from_numpy(blobs_data.train_y)
    )


def test_thread_setting_is_restored(blobs_data):
    before = torch.get_num_threads()
    _fit(blobs_data, epochs=1)
    assert torch.get_num_threads() == before


def test_divergence_is_reported():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype(np.float32) * 1e3
    model = SimpleDNN(ModelConfig(3, 1, (8,), task="regression"))
    with pytest.raises(
        TrainingError, match=r"diverged at epoch \d: the loss is (inf|nan); lower the learning rate"
    ):
        train(
            model, x, x[:, 0] * 1e3, TrainConfig(epochs=3, learning_rate=1e6, optimizer="sgd", num_threads=1)
        )


def test_labels_must_fit_the_outputs():
    model = SimpleDNN(ModelConfig(2, 2, (4,)))
    with pytest.raises(ValueError, match=r"class indices 0..1"):
        train(model, np.zeros((3, 2), np.float32), np.array([0, 1, 2]), TrainConfig(epochs=1))


def test_evaluate_reports_loss_and_accuracy(blobs_data):
    result = _fit(blobs_data, epochs=3)
    scores = evaluate(result.model, blobs_data.val_x, blobs_data.val_y)
    assert set(scores) == {"loss", "accuracy", "samples"} and scores["samples"] == 40
    assert scores["accuracy"] == result.history[-1].val_accuracy


def test_cuda_is_refused_cleanly_when_absent():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model = SimpleDNN(ModelConfig(2, 2, (4,)))
    with pytest.raises(ValueError, match="CUDA is not available"):
        train(model, np.zeros((3, 2), np.float32), np.array([0, 1, 0]), TrainConfig(epochs=1, device="cuda"))
