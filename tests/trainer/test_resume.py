"""A training caught between epochs goes on as if it had never stopped; a damaged or foreign state is refused."""

from __future__ import annotations

import pytest
import torch

from trainer import resume
from trainer.dataset import Dataset, prepare
from trainer.loop import TrainConfig, train
from trainer.model import ModelConfig, SimpleDNN
from trainer.table import read_table
from trainer.weights import WeightsError, state_to_bytes

TIMING = {"samples_per_sec", "seconds", "finished_at"}


@pytest.fixture(scope="module")
def digits(digits_csv) -> Dataset:
    return prepare(read_table(digits_csv), 0.2, seed=0)


def _config(data: Dataset, dropout: float) -> ModelConfig:
    table = data.table
    return ModelConfig(len(table.features), table.output_size, (32,), dropout=dropout, task=table.task)


def _run(data: Dataset, config: ModelConfig, train_config: TrainConfig, **options):
    model = SimpleDNN(config, seed=3)
    return train(model, data.train_x, data.train_y, train_config, data.val_x, data.val_y, **options)


def _measures(history) -> list[dict]:
    return [{k: v for k, v in m.to_dict().items() if k not in TIMING} for m in history]


@pytest.mark.parametrize(("optimizer", "dropout"), [("adam", 0.2), ("sgd", 0.0)])
def test_a_resumed_training_is_the_uninterrupted_one(digits, optimizer, dropout):
    config = _config(digits, dropout)
    settings = TrainConfig(batch_size=64, epochs=6, optimizer=optimizer, seed=7, num_threads=1,
                           **({"momentum": 0.9} if optimizer == "sgd" else {}))
    whole = _run(digits, config, settings)

    caught: list[bytes] = []
    first = _run(digits, config, settings, checkpoint_every=2,
                 on_checkpoint=lambda state: caught.append(resume.to_bytes(state)))
    assert [resume.from_bytes(c, config, 6).epoch for c in caught] == [2, 4]  # never after the last epoch
    assert _measures(first.history) == _measures(whole.history)  # catching costs the curve nothing

    state = resume.from_bytes(caught[0], config, settings.epochs)
    again = _run(digits, config, settings, resume=state)  # a fresh model and optimizer, as on a restarted peer
    assert _measures(again.history) == _measures(whole.history)
    for key, value in whole.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[key], value), key


def test_a_state_that_does_not_fit_is_refused(digits):
    config = _config(digits, 0.0)
    settings = TrainConfig(batch_size=64, epochs=4, seed=1, num_threads=1)
    caught: list[bytes] = []
    _run(digits, config, settings, checkpoint_every=1, on_checkpoint=lambda s: caught.append(resume.to_bytes(s)))
    good = caught[1]
    other = ModelConfig(config.input_size, config.output_size, (16,), task=config.task)
    with pytest.raises(WeightsError, match="this model needs"):
        resume.from_bytes(good, other, 4)
    with pytest.raises(WeightsError, match="epoch must be"):
        resume.from_bytes(good, config, 2)  # epoch 2 of a 2-epoch training: nothing left to resume
    with pytest.raises(WeightsError, match="format"):
        resume.from_bytes(state_to_bytes(SimpleDNN(config).state_dict()), config, 4)
    with pytest.raises(WeightsError):
        resume.from_bytes(good[: len(good) // 2], config, 4)

    state = resume.from_bytes(good, config, 4)
    state.optimizer[0]["exp_avg"] = torch.full_like(state.optimizer[0]["exp_avg"], float("nan"))
    with pytest.raises(WeightsError, match="finite"):
        resume.from_bytes(resume.to_bytes(state), config, 4)
    state = resume.from_bytes(good, config, 4)
    state.history[0]["loss"] = "low"
    with pytest.raises(WeightsError, match="history entry 1"):
        resume.from_bytes(resume.to_bytes(state), config, 4)
    assert len(good) <= resume.max_bytes(config, 4)
