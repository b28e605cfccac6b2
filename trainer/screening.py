"""Screening updates before they count: each one bounded, then judged on held-out rows (torch only).

Any one peer may send anything. Before its update is combined with the others':
1. It is bounded: the change it makes (`state - base`) is scaled down to at most `clip` times the typical
   change (the median norm of the changes screened with it and of recently accepted ones; with too few
   to have a median, none is bounded). Whatever its scale (x100, random weights, all zeros), an update
   then moves the model no more than a couple of honest ones do.
2. It is judged by what it does alone: the bounded update applied to `base`, measured on held-out rows
   (`loss`, given by the caller). One that makes the loss much worse than the typical update does (by more
   than `spread` robust deviations above the median change of loss, more than half that typical change,
   and more than `tolerance` of the loss itself), or that makes it not finite, is rejected. A sign-flipped
   update, bounded to honest size, is found here: it raises the loss where the others lower it.

3. What it counts for is how far it goes the way the others go: the cosine of its bounded change with the
   coordinate-wise median of all the changes (a direction fewer than half can move), over the typical
   cosine, at most 1 (`Screened.trust`). Honest updates, alike or not (skewed data makes them all point
   apart), count fully; random weights, which point nowhere in particular, hardly count; one that points
   away from the others is rejected.

Nothing here is told who is honest: the typical update is what most of them do (the median over their
senders, each sender counted once however many updates it sent), so this holds while fewer than half of
the senders are hostile. Callers keep a history (`Screened.norms`, `Screened.gains`) to judge the few
updates of a small round or an asynchronous fold against recent ones; with too few senders and no
history, only an update that doubles the held-out loss is refused (random weights do far worse).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

State = Mapping[str, torch.Tensor]

CLIP = 2.0  # an update moves the model at most this many times as far as the typical one
SPREAD = 3.0  # robust deviations (MAD) of the loss change beyond the median that still pass
TOLERANCE = 0.02  # ... and at least this share of the held-out loss (honest noise near convergence)
SHARE = 0.5  # ... and at least half the typical change itself (similar updates do not all gain alike)
ALONE = 1.0  # with too few senders to compare, only an update that alone doubles the held-out loss is refused
FEW = 3  # fewer updates than this (with their history) have no median to speak of


@dataclass
class Screened:
    """What screening made of a set of updates."""

    states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # accepted, bounded (full weights)
    trust: dict[str, float] = field(default_factory=dict)  # accepted -> 0..1: how far it goes the others' way
    rejected: dict[str, str] = field(default_factory=dict)  # name -> why
    scaled: dict[str, float] = field(default_factory=dict)  # name -> its change's size over the typical (> clip)
    norms: dict[str, float] = field(default_factory=dict)  # name -> its change's size, before bounding
    gains: dict[str, float] = field(default_factory=dict)  # name -> held-out loss change, relative to the loss
    base_loss: float = math.nan

    @property
    def outliers(self) -> dict[str, float]:
        """The updates out of line: bounded (how many times the typical size) or rejected (the same measure)."""
        return {**self.scaled, **{name: round(self.norms.get(name, 0.0) / self._typical, 1)
                                  for name in self.rejected if name not in self.scaled}}

    _typical: float = 1.0


def _change(state: State, base: State) -> dict[str, torch.Tensor]:
    return {key: state[key].double() - value.double() for key, value in base.items() if value.is_floating_point()}


def _norm(change: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(torch.sum(t * t)) for t in change.values()))


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _per_sender(values: Mapping[str, float], senders: Mapping[str, str]) -> list[float]:
    """One value per sender (the median of its updates'): a sender of many updates is one voice."""
    by_sender: dict[str, list[float]] = {}
    for name, value in values.items():
        by_sender.setdefault(senders.get(name, name), []).append(value)
    return [_median(v) for v in by_sender.values()]


def screen(base: State, states: Mapping[str, State], loss: Callable[[State], float], *, clip: float = CLIP,
           spread: float = SPREAD, tolerance: float = TOLERANCE, recent_norms: Sequence[float] = (),
           recent_gains: Sequence[float] = (), senders: Mapping[str, str] | None = None) -> Screened:
    """Bound and judge `states` (name -> weights) as updates of `base`; `recent_*`: what recently accepted
    updates measured (their norms, their relative loss changes), to judge a few against; `senders`: who sent
    each (default: each its own)."""
    senders = senders or {}
    result = Screened()
    changes = _measured(base, states, result)
    pool = [*recent_norms, *_per_sender(result.norms, senders)]
    # Too few to have a median: nothing is bounded (any one of two could set the scale), the loss judges alone.
    result._typical = (_median(pool) if len(pool) >= FEW else max(pool, default=0.0)) or 1e-12
    bounded = _bounded(base, changes, loss, clip, result)
    gains = [*recent_gains, *_per_sender(result.gains, senders)]
    if len(gains) >= FEW:
        middle = _median(gains)
        deviation = _median([abs(g - middle) for g in gains])
        limit = middle + max(spread * deviation, tolerance, SHARE * abs(middle))
    else:  # too few voices to tell the typical change of loss: only what does not plainly harm passes
        limit = ALONE
    cosines = _cosines({name: bounded[name] for name in result.gains}, base)
    pooled = _per_sender(cosines, senders)
    typical_cosine = _median(pooled) if len(pooled) >= FEW else 0.0
    for name, gain in result.gains.items():
        # Whatever the others do, an update that does not make the loss worse (by more than noise) is no harm:
        # updates improve less as training goes on, and their history must not turn that into a verdict.
        if gain > max(limit, tolerance):
            result.rejected[name] = (f"it raises the held-out loss by {100 * gain:.1f}% where the others change it "
                                     f"by {100 * _median(gains):+.1f}%")
        elif typical_cosine > 0 and cosines[name] <= 0:
            result.rejected[name] = "it points away from the other updates"
        else:
            result.states[name] = bounded[name]
            result.trust[name] = min(1.0, cosines[name] / typical_cosine) if typical_cosine > 0 else 1.0
    return result


def _measured(base: State, states: Mapping[str, State], result: Screened) -> dict[str, dict[str, torch.Tensor]]:
    """Each update's change from `base`, and its size in `result.norms`; one that is not finite is rejected."""
    changes = {}
    for name, state in states.items():
        change = _change(state, base)
        norm = _norm(change)
        if not math.isfinite(norm):
            result.rejected[name] = "its weights are not finite"
            continue
        changes[name], result.norms[name] = change, norm
    return changes


def _bounded(base: State, changes: Mapping[str, Mapping[str, torch.Tensor]], loss: Callable[[State], float],
             clip: float, result: Screened) -> dict[str, dict[str, torch.Tensor]]:
    """`base` moved by each change scaled down to at most `clip` times the typical size; how each moves the
    held-out loss goes to `result.gains` (one that makes it infinite is rejected)."""
    result.base_loss = base_loss = loss(base)
    bounded = {}
    for name, change in changes.items():
        ratio = result.norms[name] / result._typical
        factor = min(1.0, clip / ratio) if ratio > 0 else 1.0
        if factor < 1.0:
            result.scaled[name] = round(ratio, 1)
        bounded[name] = {key: (value.double() + change[key] * factor).to(value.dtype)
                         if key in change else value.detach().clone() for key, value in base.items()}
        measured = loss(bounded[name])
        if not math.isfinite(measured):
            result.rejected[name] = "it makes the held-out loss infinite"
            continue
        result.gains[name] = (measured - base_loss) / max(abs(base_loss), 1e-12)
    return bounded


def _cosines(states: Mapping[str, State], base: State) -> dict[str, float]:
    """Each change's cosine with the coordinate-wise median of all the changes."""
    if not states:
        return {}
    changes = {name: torch.cat([c.flatten() for c in _change(state, base).values()]) for name, state in states.items()}
    reference = torch.stack(list(changes.values())).median(dim=0).values
    size = float(torch.linalg.vector_norm(reference)) or 1e-12
    return {name: float(torch.dot(change, reference)) / ((float(torch.linalg.vector_norm(change)) or 1e-12) * size)
            for name, change in changes.items()}
