"""Buffered asynchronous aggregation (FedBuff, Nguyen et al., AISTATS 2022): stale updates count less.

A peer trains from the global weights of some version b and reports while the global model is at
version v >= b; its update is the change it made, `state - base`, and its staleness is `v - b`. A
buffer of K such updates is folded into the current global weights at once: each change is scaled
by `staleness_weight` (1/sqrt(1+s), FedBuff's polynomial discount) and the scaled changes are
combined as rounds combine weights (FedAvg by samples, or the coordinate-wise median / trimmed
mean), then added. The sample weights are normalised over the buffer, not over the discounts, so a
buffer of stale updates moves the model less than a fresh one. With every update fresh (s = 0) a
fold is exactly a synchronous FedAvg round of the same peers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from trainer.aggregation import State, average


def staleness_weight(staleness: int) -> float:
    """How much an update `staleness` global versions old counts (1 when fresh)."""
    if staleness < 0:
        raise ValueError(f"staleness cannot be negative, got {staleness}")
    return 1.0 / math.sqrt(1.0 + staleness)


@dataclass(frozen=True)
class Contribution:
    """One peer's update: the weights it started from, the weights it reported, its samples, its age."""

    base: State
    state: State
    samples: int
    staleness: int

    @property
    def weight(self) -> float:
        return staleness_weight(self.staleness)


def applied(current: State, contribution: Contribution) -> dict[str, torch.Tensor]:
    """`current` moved by one contribution's staleness-weighted change, as a fold would move it by that one alone."""
    c = contribution
    return {key: (value.double() + (c.state[key].double() - c.base[key].double()) * c.weight).to(value.dtype)
            if value.is_floating_point() else value.detach().clone() for key, value in current.items()}


Combine = Callable[[Sequence[State], Sequence[float]], dict[str, torch.Tensor]]


def fold(current: State, contributions: Sequence[Contribution],
         combine: Combine = average) -> dict[str, torch.Tensor]:
    """The next global weights: `current` plus the combined, staleness-weighted changes of the buffer."""
    if not contributions:
        raise ValueError("there is nothing to fold")
    changes = []
    for c in contributions:
        changes.append({key: (c.state[key].double() - c.base[key].double()) * c.weight
                        for key, value in current.items() if value.is_floating_point()})
    merged = combine(changes, [c.samples for c in contributions])
    return {key: (value.double() + merged[key]).to(value.dtype) if value.is_floating_point()
            else value.detach().clone() for key, value in current.items()}
