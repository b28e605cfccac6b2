"""Coordinate-wise aggregation of peers' model states: weighted FedAvg, median, trimmed mean."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

State = Mapping[str, torch.Tensor]


class AggregationError(ValueError):
    """States that cannot be combined (different keys or shapes, bad weights)."""


def _stacked(states: Sequence[State]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Every key's tensors stacked along a new first dimension [peers, *shape], in float64."""
    if not states:
        raise AggregationError("there are no states to aggregate")
    keys = list(states[0].keys())
    for i, state in enumerate(states[1:], start=1):
        if set(state.keys()) != set(keys):
            raise AggregationError(f"state {i} has keys {sorted(state.keys())}, state 0 has {sorted(keys)}")
        for key in keys:
            if state[key].shape != states[0][key].shape:
                raise AggregationError(
                    f"state {i} has {key} of shape {tuple(state[key].shape)}, "
                    f"state 0 has {tuple(states[0][key].shape)}"
                )
    # float64 sums: averaging identical states gives them back exactly once cast to float32.
    return keys, {key: torch.stack([state[key].detach().cpu().double() for state in states]) for key in keys}


def _restore(
    keys: list[str], states: Sequence[State], values: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        first = states[0][key]
        # Non-float entries (counters, say) are not averaged: the first state's value is kept.
        out[key] = values[key].to(first.dtype) if first.is_floating_point() else first.detach().cpu().clone()
    return out


def average(states: Sequence[State], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Weighted mean (FedAvg: weights = samples per peer); weights are normalised to sum to 1."""
    keys, stacked = _stacked(states)
    w = [1.0] * len(states) if weights is None else [float(v) for v in weights]
    if len(w) != len(states):
        raise AggregationError(f"got {len(states)} states but {len(w)} weights")
    if not all(math.isfinite(v) and v >= 0 for v in w) or sum(w) <= 0:
        raise AggregationError(f"weights must be non-negative numbers with a positive sum; got {w}")
    share = torch.tensor(w, dtype=torch.float64) / sum(w)  # [peers]
    means = {key: torch.tensordot(share, values, dims=1) for key, values in stacked.items()}
    return _restore(keys, states, means)


def median(states: Sequence[State]) -> dict[str, torch.Tensor]:
    """Coordinate-wise median (the mean of the two middle values for an even count of peers)."""
    keys, stacked = _stacked(states)
    count = len(states)
    middles: dict[str, torch.Tensor] = {}
    for key, values in stacked.items():
        ordered = values.sort(dim=0).values  # [peers, *shape]
        if count % 2:
            middles[key] = ordered[count // 2]
        else:
            middles[key] = (ordered[count // 2 - 1] + ordered[count // 2]) / 2
    return _restore(keys, states, middles)


def trimmed_mean(states: Sequence[State], trim_fraction: float = 0.2) -> dict[str, torch.Tensor]:
    """Coordinate-wise mean after dropping the floor(trim_fraction * peers) largest and smallest values."""
    if not (math.isfinite(trim_fraction) and 0.0 <= trim_fraction < 0.5):
        raise AggregationError(f"trim_fraction must be at least 0 and below 0.5; got {trim_fraction}")
    keys, stacked = _stacked(states)
    cut = math.floor(trim_fraction * len(states))
    means = {
        key: values.sort(dim=0).values[cut : len(states) - cut].mean(dim=0) for key, values in stacked.items()
    }
    return _restore(keys, states, means)
