"""Federated optimizers: the server's step from the round's aggregate, its state kept, and FedProx's pull."""

from __future__ import annotations

import pytest
import torch

from trainer import serveropt
from trainer.loop import TrainConfig, train
from trainer.model import ModelConfig, SimpleDNN
from trainer.serveropt import ServerOptimizer


def weights(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 3), value), "steps": torch.tensor(4, dtype=torch.int64)}


def test_server_momentum_with_no_momentum_and_a_step_of_one_is_fedavg():
    new, _ = ServerOptimizer("fedavgm", lr=1.0, momentum=0.0).step(weights(1.0), weights(1.5), None)
    assert torch.equal(new["w"], weights(1.5)["w"]) and new["steps"].item() == 4


def test_server_momentum_carries_the_last_moves_into_the_next_step():
    optimizer = ServerOptimizer("fedavgm", lr=1.0, momentum=0.5)
    first, state = optimizer.step(weights(0.0), weights(1.0), None)  # moved by 1
    second, _ = optimizer.step(first, weights(2.0), state)  # moved by 1 again, plus half the last move
    assert torch.allclose(second["w"], torch.full((2, 3), 2.5))


@pytest.mark.parametrize("algorithm", ["fedadam", "fedyogi"])
def test_adaptive_servers_move_each_weight_about_their_step_towards_the_aggregate(algorithm):
    optimizer = ServerOptimizer(algorithm, lr=0.01)
    current = {"w": torch.tensor([0.0, 0.0, 0.0])}
    aggregate = {"w": torch.tensor([1.0, -0.1, 0.0])}
    new, state = optimizer.step(current, aggregate, None)
    # Normalised by its own second moment: the sign of Δ, a step of about lr whatever Δ's size; no move, no step.
    assert new["w"][0] > 0 > new["w"][1] and new["w"][2] == 0
    assert abs(new["w"][0] - new["w"][1].abs()) < 0.01 and new["w"][0] < 0.2
    assert set(state) == {"m.w", "v.w"}
    later, _ = optimizer.step(new, aggregate, state)
    assert later["w"][0] > new["w"][0]  # momentum and the same direction: it keeps going


def test_yogi_grows_its_second_moment_more_slowly_than_adam():
    current, aggregate = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    _, adam = ServerOptimizer("fedadam").step(current, aggregate, {"v.w": torch.zeros(1, dtype=torch.float64)})
    _, yogi = ServerOptimizer("fedyogi").step(current, aggregate, {"v.w": torch.zeros(1, dtype=torch.float64)})
    assert adam["v.w"].item() == pytest.approx(0.01) and yogi["v.w"].item() == pytest.approx(0.01)
    _, adam = ServerOptimizer("fedadam").step(current, aggregate, {"v.w": torch.full((1,), 4.0, dtype=torch.float64)})
    _, yogi = ServerOptimizer("fedyogi").step(current, aggregate, {"v.w": torch.full((1,), 4.0, dtype=torch.float64)})
    assert adam["v.w"].item() == pytest.approx(0.99 * 4 + 0.01) and yogi["v.w"].item() == pytest.approx(4 - 0.01)


def test_the_state_is_kept_as_a_file_and_refused_for_another_model():
    optimizer = ServerOptimizer("fedadam")
    _, state = optimizer.step(weights(0.0), weights(1.0), None)
    data = serveropt.state_to_bytes(state, optimizer)
    back = serveropt.state_from_bytes(data, weights(0.0))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="does not fit the model"):
        serveropt.state_from_bytes(data, {"w": torch.zeros(3)})
    with pytest.raises(ValueError, match="has no server optimizer"):
        ServerOptimizer("fedprox")


def test_fedprox_keeps_a_local_training_nearer_its_starting_weights_and_zero_changes_nothing():
    config = ModelConfig(4, 3, (16,), 0.0, "classification")
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 4, generator=generator), torch.randint(0, 3, (256,), generator=generator)
    start = SimpleDNN(config, seed=1).state_dict()

    def moved(mu: float) -> tuple[float, list[float]]:
        model = SimpleDNN(config, seed=1)
        result = train(model, x, y, TrainConfig(epochs=5, learning_rate=0.05, seed=2, proximal_mu=mu),
                       initial_state=start)
        distance = sum(((model.state_dict()[k] - start[k]) ** 2).sum().item() for k in start) ** 0.5
        return distance, [m.loss for m in result.history]

    free, free_curve = moved(0.0)
    pulled, pulled_curve = moved(10.0)
    assert pulled < 0.5 * free
    again, again_curve = moved(0.0)
    assert again == free and again_curve == free_curve  # no proximal term: the same training as before
    with pytest.raises(ValueError, match="proximal_mu"):
        TrainConfig(proximal_mu=-1.0)
