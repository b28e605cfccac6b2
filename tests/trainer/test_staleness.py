"""Buffered asynchronous aggregation: fresh updates fold like FedAvg, stale ones count less."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.aggregation import average, median
from trainer.staleness import Contribution, fold, staleness_weight


def state(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float32), "steps": torch.tensor(7)}


def test_the_weight_falls_with_staleness_as_fedbuff_discounts_it():
    assert staleness_weight(0) == 1.0
    assert staleness_weight(3) == pytest.approx(0.5)
    assert [staleness_weight(s) for s in range(6)] == sorted((staleness_weight(s) for s in range(6)), reverse=True)
    with pytest.raises(ValueError):
        staleness_weight(-1)


def test_fresh_updates_fold_into_exactly_what_a_synchronous_fedavg_round_gives():
    current = state(1.0, 2.0)
    peers = [state(3.0, 2.0), state(1.0, 6.0)]
    folded = fold(current, [Contribution(current, p, samples, 0) for p, samples in zip(peers, (300, 100), strict=True)])
    assert torch.allclose(folded["w"], average(peers, [300, 100])["w"])
    assert folded["w"].dtype == torch.float32
    assert folded["steps"].item() == 7  # counters are not averaged


def test_a_stale_update_moves_the_model_less_than_the_same_update_fresh():
    base, current = state(0.0, 0.0), state(1.0, 1.0)
    reported = state(2.0, 2.0)  # a change of +2 from where it started
    fresh = fold(current, [Contribution(base, reported, 10, 0)])["w"] - current["w"]
    stale = fold(current, [Contribution(base, reported, 10, 3)])["w"] - current["w"]
    assert torch.allclose(fresh, torch.tensor([2.0, 2.0]))
    assert torch.allclose(stale, fresh * 0.5)


def test_the_change_is_applied_to_the_current_weights_not_the_stale_base():
    # The peer started from version 0 (all zeros); the model has moved on to 10s meanwhile.
    folded = fold(state(10.0, 10.0), [Contribution(state(0.0, 0.0), state(1.0, -1.0), 5, 1)])
    assert torch.allclose(folded["w"], torch.tensor([10.0 + 1 / math.sqrt(2), 10.0 - 1 / math.sqrt(2)]))


def test_a_robust_combiner_outvotes_a_wild_update_in_the_buffer():
    current = state(0.0, 0.0)
    honest = [Contribution(current, state(1.0, 1.0), 10, 0) for _ in range(2)]
    wild = Contribution(current, state(1e6, -1e6), 10, 0)
    folded = fold(current, [*honest, wild], lambda states, samples: median(states))
    assert torch.allclose(folded["w"], torch.tensor([1.0, 1.0]))


def test_nothing_to_fold_is_an_error():
    with pytest.raises(ValueError):
        fold(state(0.0), [])
