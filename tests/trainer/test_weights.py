"""Model files and aggregation: round trips, refusals, and the arithmetic of FedAvg, median, trimmed mean."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_tensors

from trainer.dataset import prepare
from trainer.loop import TrainConfig, train
from trainer.model import ModelConfig, SimpleDNN
from trainer.predictor import Predictor
from trainer.table import read_table
from trainer.weights import (
    CHECKPOINT_FORMAT,
    METADATA_KEY,
    AggregationError,
    Checkpoint,
    WeightsError,
    average,
    checkpoint_bytes,
    load_checkpoint,
    median,
    read_metadata,
    save_checkpoint,
    state_from_bytes,
    state_to_bytes,
    trimmed_mean,
)

CONFIG = ModelConfig(input_size=3, output_size=2, hidden=(4,))


@pytest.fixture(scope="module")
def trained(breast_cancer_csv):
    """A small trained classifier with its checkpoint, and the table it learned from."""
    table = read_table(breast_cancer_csv)
    data = prepare(table, 0.2, seed=0)
    config = ModelConfig(len(table.features), table.output_size, (16,))
    model = train(SimpleDNN(config), data.train_x, data.train_y, TrainConfig(epochs=3, num_threads=1)).model
    checkpoint = Checkpoint(
        config=config,
        features=table.features,
        target=table.target,
        classes=table.classes,
        normalization=data.normalization,
        metadata={"session": "s1", "round": 3},
    )
    return model, checkpoint, table


def test_save_load_gives_the_same_predictions(trained, tmp_path, breast_cancer_csv):
    model, checkpoint, table = trained
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, checkpoint)
    loaded, restored = load_checkpoint(path)
    assert restored.to_dict() == checkpoint.to_dict()
    before = Predictor(model, checkpoint).predict_table(table)
    after = Predictor(loaded, restored).predict_csv(breast_cancer_csv)
    assert before == after and set(after) <= {"0", "1"} and len(after) == table.rows


def test_checkpoints_travel_as_bytes_and_file_objects(trained):
    model, checkpoint, table = trained
    data = checkpoint_bytes(model, checkpoint)
    buffer = io.BytesIO()
    save_checkpoint(buffer, model, checkpoint)
    assert buffer.getvalue() == data
    loaded, restored = load_checkpoint(io.BytesIO(data))
    x = torch.from_numpy(checkpoint.normalization.apply(table.x[:10]))
    assert torch.equal(loaded(x), model.eval()(x))
    assert read_metadata(data)["metadata"] == {"session": "s1", "round": 3}
    assert checkpoint_bytes(model, checkpoint) == data  # same model, same bytes


def test_predictor_reads_features_by_name_without_the_target(trained):
    model, checkpoint, table = trained
    names = list(reversed(checkpoint.features))  # another column order, no target
    rows = table.x[:5, ::-1]
    csv = ",".join(names) + "\n" + "".join(",".join(f"{v:.9g}" for v in row) + "\n" for row in rows)
    assert Predictor(model, checkpoint).predict_csv(csv.encode()) == Predictor(model, checkpoint).predict(
        table.x[:5]
    )


def test_regression_predictions_come_back_in_target_units(diabetes_csv):
    table = read_table(diabetes_csv, task="regression")
    data = prepare(table, 0.2, seed=0)
    config = ModelConfig(len(table.features), 1, (32,), task="regression")
    model = train(
        SimpleDNN(config), data.train_x, data.train_y, TrainConfig(epochs=30, batch_size=32, num_threads=1)
    ).model
    checkpoint = Checkpoint(config, table.features, table.target, None, data.normalization)
    predicted = np.array(Predictor(*load_checkpoint(checkpoint_bytes(model, checkpoint))).predict(table.x))
    assert abs(predicted.mean() - table.y.mean()) < 15  # target mean is ~152
    assert np.corrcoef(predicted, table.y)[0, 1] > 0.6


def _state(value: float, config: ModelConfig = CONFIG) -> dict[str, torch.Tensor]:
    return {key: torch.full(shape, value) for key, shape in config.parameter_shapes().items()}


def test_loading_refuses_wrong_shapes():
    other = ModelConfig(input_size=3, output_size=2, hidden=(5,))
    with pytest.raises(WeightsError, match=r"layers.0.weight has shape \[4, 3\]; this model needs \[5, 3\]"):
        state_from_bytes(state_to_bytes(SimpleDNN(CONFIG).state_dict()), other)
    # a checkpoint whose description promises another model than its tensors hold
    described = Checkpoint(other, ["a", "b", "c"], "label", ["x", "y"], _normalization(3))
    document = json.dumps({"format": CHECKPOINT_FORMAT, "data": described.to_dict()})
    tampered = save_tensors(SimpleDNN(CONFIG).state_dict(), metadata={METADATA_KEY: document})
    with pytest.raises(WeightsError, match="this model needs"):
        load_checkpoint(tampered)


def test_loading_refuses_missing_tensors_and_non_finite_values():
    state = _state(0.5)
    state["layers.0.bias"][1] = float("nan")
    with pytest.raises(WeightsError, match="layers.0.bias holds NaN or infinite values"):
        state_from_bytes(state_to_bytes(state), CONFIG)
    del state["layers.2.weight"]
    with pytest.raises(WeightsError, match=r"missing \['layers.2.weight'\]"):
        state_from_bytes(state_to_bytes(state), CONFIG)


@pytest.mark.parametrize("data", [b"", b"garbage bytes that are not safetensors", b"\x80\x04\x95pickle"])
def test_loading_refuses_what_is_not_a_model_file(data):
    with pytest.raises(WeightsError, match="not a safetensors file"):
        load_checkpoint(data)


def test_loading_refuses_pickles_and_foreign_safetensors(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(SimpleDNN(CONFIG).state_dict(), path)
    with pytest.raises(WeightsError, match="not a safetensors file"):
        load_checkpoint(path)
    with pytest.raises(WeightsError, match="not a peertrain weights file"):
        load_checkpoint(save_tensors(_state(1.0)))
    with pytest.raises(
        WeightsError, match="not a peertrain model checkpoint: its format is 'peertrain.state/1'"
    ):
        load_checkpoint(state_to_bytes(_state(1.0)))


def test_state_round_trip_keeps_values_and_metadata():
    state = SimpleDNN(CONFIG, seed=3).state_dict()
    data = state_to_bytes(state, {"peer": "a", "samples": 120})
    back = state_from_bytes(data, CONFIG)
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert read_metadata(data) == {"peer": "a", "samples": 120}


def _normalization(size: int):
    from trainer.normalization import Normalization

    return Normalization(mean=[0.0] * size, std=[1.0] * size)


def test_checkpoint_must_describe_its_model():
    with pytest.raises(WeightsError, match="needs 2 class labels"):
        Checkpoint(CONFIG, ["a", "b", "c"], "label", ["only"], _normalization(3))
    with pytest.raises(WeightsError, match="needs 3 distinct feature names"):
        Checkpoint(CONFIG, ["a", "b"], "label", ["x", "y"], _normalization(3))


def test_average_of_identical_states_is_that_state():
    state = SimpleDNN(CONFIG, seed=1).state_dict()
    result = average([state, state, state], [1, 2, 3.5])
    assert all(torch.equal(result[k], state[k]) and result[k].dtype == torch.float32 for k in state)


def test_average_respects_and_normalises_weights():
    result = average([_state(0.0), _state(1.0)], [1, 3])
    assert torch.allclose(result["layers.0.weight"], torch.full((4, 3), 0.75))
    scaled = average([_state(0.0), _state(1.0)], [100, 300])
    assert all(torch.equal(result[k], scaled[k]) for k in result)
    assert torch.allclose(average([_state(0.0), _state(1.0)])["layers.2.bias"], torch.full((2,), 0.5))


def test_median_outvotes_a_corrupted_peer():
    honest = [_state(1.0), _state(1.1), _state(0.9)]
    attacked = median([*honest, _state(1e6)])
    assert torch.allclose(attacked["layers.0.weight"], torch.full((4, 3), 1.05))
    assert torch.allclose(median(honest)["layers.0.bias"], torch.full((4,), 1.0))
    assert average([*honest, _state(1e6)])["layers.0.bias"][0] > 1e5  # what the median protects against


def test_trimmed_mean_drops_the_extremes():
    states = [_state(v) for v in (-1e6, 1.0, 2.0, 3.0, 1e6)]
    assert torch.allclose(trimmed_mean(states, 0.2)["layers.0.weight"], torch.full((4, 3), 2.0))
    with pytest.raises(AggregationError, match="trim_fraction"):
        trimmed_mean(states, 0.5)


def test_aggregation_refuses_mismatched_states():
    with pytest.raises(AggregationError, match="shape"):
        average([_state(0.0), _state(0.0, ModelConfig(3, 2, (5,)))])
    with pytest.raises(AggregationError, match="2 states but 1 weights"):
        average([_state(0.0), _state(1.0)], [1])
    with pytest.raises(AggregationError, match="positive sum"):
        average([_state(0.0), _state(1.0)], [0, 0])
    with pytest.raises(AggregationError, match="no states"):
        median([])
