"""Screening updates before they count: each one bounded, then judged on held-out rows (torch only).

Any one peer may send anything. Before its update is combined with the others':
1. It is bounded: the change it makes (`state - base`) is scaled down to at most `clip` times the typical
   change (the median norm of the changes screened with it and of recently accepted ones; with too few
   to have a median, none is bounded). Whatever its scale (x100, random weights, all zeros), an update
   then moves the model no more than a couple of honest ones do.
2. It is judged by what it does to the others: the held-out loss (`loss`, given by the caller) of `base`
   moved by the mean of all the bounded changes, against the same without this one (leave-one-out). One
   whose presence makes the combined update much worse (by more than `spread` robust deviations above what
   the typical update's presence does, and more than `tolerance` of the loss itself), or makes the loss
   not finite, is rejected if on its own, too, it makes the model worse (one that improves it alone only
   went less far, or elsewhere, than the rest). Honest updates from skewed data each pull their own way
   and can each make the loss worse alone; together they are better, and none is refused for being
   different. A sign-flipped update, bounded to honest size, cancels the others' progress and is found
   here. A lone update has no others: it is refused only if it alone doubles the held-out loss.
3. What it counts for is how far it goes the way the others go: the cosine of its bounded change with the
   coordinate-wise median of all the changes (a direction fewer than half can move), over the typical
   cosine, at most 1 (`Screened.trust`). Honest updates count fully; random weights, which point nowhere
   in particular, hardly count; one that points away from the others is rejected.

Nothing here is told who is honest: the typical update is what most of them do (the median over their
senders, each sender counted once however many updates it sent), so this holds while fewer than half of
the senders are hostile. Callers keep a history (`Screened.norms`, `Screened.gains`) to judge the few
updates of a small round or an asynchronous fold against recent ones; with too few to compare and no
history, an update whose presence makes the combined update `FEW_LIMIT` worse is refused; a fold left to
one peer keeps, with a history, only the updates that alone make the model no more than `tolerance` worse.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

State = Mapping[str, torch.Tensor]

CLIP = 2.0  # an update moves the model at most this many times as far as the typical one
SPREAD = 3.0  # robust deviations (MAD) of the loss change beyond the median that still pass
TOLERANCE = 0.05  # ... and at least this share of the held-out loss (honest updates differ by this much)
FEW_LIMIT = 0.1  # with too few to compare, the share of the held-out loss one update may cost the others
ALONE = 1.0  # a lone update with nothing to compare it with is refused only if it doubles the held-out loss
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
           recent_gains: Sequence[float] = (), senders: Mapping[str, str] | None = None,
           base_loss: float | None = None) -> Screened:
    """Bound and judge `states` (name -> weights) as updates of `base`; `recent_*`: what recently accepted
    updates measured (their norms, what their presence cost the others), to judge a few against; `senders`:
    who sent each (default: each its own); `base_loss`: `loss(base)` when the caller measured it already."""
    senders = senders or {}
    result = Screened()
    changes = _measured(base, states, result)
    pool = [*recent_norms, *_per_sender(result.norms, senders)]
    # Too few to have a median: nothing is bounded (any one of two could set the scale), the loss judges alone.
    result._typical = (_median(pool) if len(pool) >= FEW else max(pool, default=0.0)) or 1e-12
    bounded = _bounded(changes, clip, result)
    voices = len({senders.get(name, name) for name in bounded})
    _costs(base, bounded, loss, result, senders, base_loss)
    costs = [*recent_gains, *_per_sender(result.gains, senders)]
    if voices == 1:
        # No others to compare with: without a history, only plain harm is refused; with one (a fold left to a
        # single peer), what others' updates cost says nothing of this one's effect alone: it may cost noise.
        bar = ALONE if not recent_gains else tolerance
    elif len(costs) >= FEW:
        middle = _median(costs)
        # Whatever the others do, an update that costs them no more than noise is no harm: updates improve
        # less as training goes on, and their history must not turn that into a verdict.
        bar = max(middle + max(spread * _median([abs(c - middle) for c in costs]), tolerance), tolerance)
    else:  # too few voices to tell what an update's presence typically costs
        bar = FEW_LIMIT
    moved = {name: _moved(base, bounded[name]) for name in result.gains}
    cosines = _cosines(bounded, result.gains, senders)
    pooled = _per_sender(cosines, senders)
    typical_cosine = _median(pooled) if len(pooled) >= FEW else 0.0
    for name, cost in result.gains.items():
        # One that improves the model on its own is no harm either: it only went less far, or elsewhere.
        if cost > bar and (voices == 1 or _alone(moved[name], loss, result) > tolerance):
            result.rejected[name] = (f"with it the update of the round raises the held-out loss by {100 * cost:.1f}% "
                                     "more than without it, and alone it makes the model worse"
                                     if voices > 1 else f"it raises the held-out loss by {100 * cost:.1f}%")
        elif typical_cosine > 0 and cosines[name] <= 0:
            result.rejected[name] = "it points away from the other updates"
        else:
            result.states[name] = moved[name]
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


def _bounded(changes: Mapping[str, Mapping[str, torch.Tensor]], clip: float,
             result: Screened) -> dict[str, dict[str, torch.Tensor]]:
    """Each change scaled down to at most `clip` times the typical size (those scaled go to `result.scaled`)."""
    bounded = {}
    for name, change in changes.items():
        ratio = result.norms[name] / result._typical
        factor = min(1.0, clip / ratio) if ratio > 0 else 1.0
        if factor < 1.0:
            result.scaled[name] = round(ratio, 1)
        bounded[name] = {key: value * factor for key, value in change.items()}
    return bounded


def _moved(base: State, change: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: (value.double() + change[key]).to(value.dtype) if key in change else value.detach().clone()
            for key, value in base.items()}


def _alone(state: State, loss: Callable[[State], float], result: Screened) -> float:
    """What one update does to the held-out loss on its own, as a share of the base's loss."""
    measured = loss(state)
    return (measured - result.base_loss) / max(abs(result.base_loss), 1e-12) if math.isfinite(measured) else math.inf


def _costs(base: State, bounded: Mapping[str, Mapping[str, torch.Tensor]], loss: Callable[[State], float],
           result: Screened, senders: Mapping[str, str], base_loss: float | None = None) -> None:
    """What each sender's presence costs the combined update (the mean over senders of each one's mean
    bounded change) on the held-out loss, as a share of `base`'s loss, in `result.gains` for each of its
    updates (a lone sender: what each of its changes does to `base`); an update whose presence makes the loss infinite
    is rejected. By sender, so that a peer with two updates in a fold cannot hide one behind the other."""
    result.base_loss = base_loss = loss(base) if base_loss is None else base_loss
    scale = max(abs(base_loss), 1e-12)
    means = _by_sender(bounded, senders)
    count = len(means)
    if count == 0:
        return
    if count == 1:  # no others to cost: each update by what it does to `base` alone (not their mean, which
        # averages random noise away: a peer that fills a fold by itself must not pass by sending more)
        for name in bounded:
            cost = _alone(_moved(base, bounded[name]), loss, result)
            if math.isfinite(cost):
                result.gains[name] = cost
            else:
                result.rejected[name] = "it makes the held-out loss infinite"
        return
    total = {key: sum(change[key] for change in means.values()) for key in next(iter(means.values()))}
    with_all = loss(_moved(base, {key: value / count for key, value in total.items()}))
    for sender, change in means.items():
        without = base_loss if count == 1 else loss(
            _moved(base, {key: (value - change[key]) / (count - 1) for key, value in total.items()}))
        for name in (n for n in bounded if senders.get(n, n) == sender):
            if not math.isfinite(with_all) and math.isfinite(without):
                result.rejected[name] = "it makes the held-out loss infinite"
            elif math.isfinite(with_all):
                result.gains[name] = (with_all - without) / scale if math.isfinite(without) else -math.inf
            else:  # infinite with it and without: another one is to blame
                result.gains[name] = -math.inf


def _by_sender(bounded: Mapping[str, Mapping[str, torch.Tensor]],
               senders: Mapping[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    """Each sender's mean change."""
    grouped: dict[str, list[Mapping[str, torch.Tensor]]] = {}
    for name, change in bounded.items():
        grouped.setdefault(senders.get(name, name), []).append(change)
    return {sender: {key: sum(c[key] for c in changes) / len(changes) for key in changes[0]}
            for sender, changes in grouped.items()}


def _cosines(bounded: Mapping[str, Mapping[str, torch.Tensor]], names: Mapping[str, float],
             senders: Mapping[str, str]) -> dict[str, float]:
    """Each change (of `names`) with the coordinate-wise median of the senders' mean changes: their cosine."""
    if not names:
        return {}

    def flat(change: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([c.flatten() for c in change.values()])

    kept = {name: bounded[name] for name in names}
    reference = torch.stack([flat(c) for c in _by_sender(kept, senders).values()]).median(dim=0).values
    size = float(torch.linalg.vector_norm(reference)) or 1e-12
    changes = {name: flat(change) for name, change in kept.items()}
    return {name: float(torch.dot(change, reference)) / ((float(torch.linalg.vector_norm(change)) or 1e-12) * size)
            for name, change in changes.items()}
