"""SCAFFOLD: the peer's correction applied at every local step, and the control variates the server derives."""

from __future__ import annotations

import pytest
import torch

from trainer import scaffold
from trainer.loop import TrainConfig, train
from trainer.model import ModelConfig, SimpleDNN

CONFIG = ModelConfig(4, 3, (8,), 0.0, "classification")


def data(rows: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 4, generator=generator), torch.randint(0, 3, (rows,), generator=generator)


def filled(value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, value) for k, v in SimpleDNN(CONFIG, seed=0).state_dict().items()}


def test_a_step_moves_each_parameter_by_minus_the_learning_rate_times_the_correction():
    x, y = data()
    start = SimpleDNN(CONFIG, seed=1).state_dict()
    correction = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(3)) for k, v in start.items()}

    def one_step(with_correction: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        model = SimpleDNN(CONFIG, seed=1)
        # One batch of every row: one step, from the same gradient either way.
        train(model, x, y, TrainConfig(epochs=1, batch_size=64, learning_rate=0.1, optimizer="sgd", seed=2),
              initial_state=start, correction=with_correction)
        return model.state_dict()

    plain, corrected = one_step(None), one_step(correction)
    for key in start:
        assert torch.allclose(corrected[key] - plain[key], -0.1 * correction[key], atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(one_step(filled(0.0)).values(), plain.values(), strict=True))


def test_a_correction_that_does_not_fit_the_model_is_refused():
    x, y = data()
    bad = {**filled(0.1), "layers.0.weight": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="does not fit"):
        train(SimpleDNN(CONFIG, seed=1), x, y, TrainConfig(epochs=1), correction=bad)
    with pytest.raises(ValueError, match="not finite"):
        train(SimpleDNN(CONFIG, seed=1), x, y, TrainConfig(epochs=1), correction=filled(float("nan")))


def test_local_steps_count_every_batch_of_every_epoch():
    assert scaffold.local_steps(120, 16, 2) == 16  # 8 batches (the last one short), twice
    assert scaffold.local_steps(5, 64, 3) == 3
    with pytest.raises(ValueError):
        scaffold.local_steps(0, 16, 1)


def test_a_peers_control_variate_is_its_average_step_less_the_correction_it_applied():
    sent, trained = filled(1.0), filled(0.5)  # it moved by -0.5 over 5 steps of 0.1: an average gradient of 1
    assert all(torch.allclose(v, torch.ones_like(v)) for v in
               scaffold.control_after(sent, trained, filled(0.0), 5, 0.1).values())
    # Part of that move was the correction's (c - c_i = 0.2 each step): its own data pulled by 0.8.
    assert all(torch.allclose(v, torch.full_like(v, 0.8)) for v in
               scaffold.control_after(sent, trained, filled(0.2), 5, 0.1).values())
    with pytest.raises(ValueError):
        scaffold.control_after(sent, trained, filled(0.0), 0, 0.1)


def test_the_server_moves_c_by_the_used_peers_share_of_their_combined_deltas():
    server = filled(1.0)
    after = scaffold.server_after(server, filled(3.0), share=0.5)  # half the rows: half the combined delta
    assert all(torch.allclose(v, torch.full_like(v, 2.5)) for v in after.values())
    with pytest.raises(ValueError):
        scaffold.server_after(server, filled(3.0), share=1.5)
    assert all(torch.equal(v, torch.full_like(v, 0.5)) for v in
               scaffold.correction(filled(1.0), filled(0.5)).values())
    assert all(torch.equal(v, torch.ones_like(v)) for v in scaffold.correction(filled(1.0), None).values())
    assert all(torch.equal(v, torch.full_like(v, 1.5)) for v in scaffold.delta(filled(2.0), filled(0.5)).values())


def test_corrected_peers_on_opposite_shards_drift_less_from_the_joint_optimum_than_plain_ones():
    """Two peers, each with one half of a regression problem whose halves pull apart: FedAvg's local steps
    overshoot towards each peer's own optimum; with SCAFFOLD's corrections the averaged model ends nearer the
    model trained on all rows (the quantity the paper bounds)."""
    regression = ModelConfig(4, 1, (), 0.0, "regression")
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(256, 4, generator=generator)
    y = torch.cat([x[:128] @ torch.tensor([2.0, 0, 0, 0]) + 1, x[128:] @ torch.tensor([0, 0, -2.0, 0]) - 1])
    shards = [(x[:128], y[:128]), (x[128:], y[128:])]
    config = TrainConfig(epochs=2, batch_size=16, learning_rate=0.05, optimizer="sgd", seed=0)
    joint = SimpleDNN(regression, seed=0)
    train(joint, x, y, TrainConfig(epochs=200, batch_size=256, learning_rate=0.1, optimizer="sgd", seed=0))

    def federate(corrected: bool) -> float:
        current = SimpleDNN(regression, seed=0).state_dict()
        server, controls = scaffold.zeros(current), [None, None]
        steps = scaffold.local_steps(128, config.batch_size, config.epochs)
        for _ in range(15):
            trained, deltas = [], []
            for i, (sx, sy) in enumerate(shards):
                applied = scaffold.correction(server, controls[i])
                model = SimpleDNN(regression, seed=0)
                train(model, sx, sy, config, initial_state=current, correction=applied if corrected else None)
                trained.append(model.state_dict())
                after = scaffold.control_after(current, trained[-1], applied, steps, config.learning_rate)
                deltas.append(scaffold.delta(after, controls[i]))
                controls[i] = after
            current = {k: (trained[0][k] + trained[1][k]) / 2 for k in current}
            mean = {k: (deltas[0][k] + deltas[1][k]) / 2 for k in current}
            server = scaffold.server_after(server, mean, share=1.0)
        return sum(((current[k] - joint.state_dict()[k]) ** 2).sum().item() for k in current) ** 0.5

    assert federate(corrected=True) < 0.6 * federate(corrected=False)  # measured: 0.034 against 0.071
