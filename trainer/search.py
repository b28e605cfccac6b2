"""Search spaces for sweeps that search: what a user may ask to vary, checked against the platform's limits.

A space maps a hyperparameter to a list of values to choose from, a range `{"low", "high", "log"}` (whole
numbers when both ends are, for the settings that are whole numbers), or one fixed value. `parse` checks
one and returns its normal form, which the session stores and the coordinator turns into the sampler's
distributions (tasks/search.py); `hyperparameters` turns a trial's sampled values back into a peer's
settings. Torch-free and library-free: the web API validates with it.

The rungs (`rungs`) are the epochs at which a trial is scored on the held-out rows and may be stopped:
successive halving's geometric grid (`REDUCTION`-fold apart), so that a trial is scored at most four times
and every trial of a session is scored at the same epochs (a median pruner compares trials epoch by epoch).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from trainer.limits import DEFAULTS, LimitError, check_hyperparameters

# What a search may vary (every setting a peer trains with).
SEARCHABLE = ("learning_rate", "batch_size", "hidden", "epochs", "optimizer", "weight_decay", "dropout")
# Settings that are whole numbers: a range of them samples whole numbers.
WHOLE = ("batch_size", "epochs")
# Settings a range may be given for.
NUMERIC = ("learning_rate", "batch_size", "epochs", "weight_decay", "dropout")
SAMPLERS = ("tpe", "random")
PRUNERS = ("asha", "median", "none")
MAX_TRIALS = 1000
MAX_CHOICES = 64
REDUCTION = 3  # successive halving keeps the best third at each rung
MAX_RUNGS = 4

# With nothing given, a sweep searches this: the settings that matter most on tabular data, over ranges
# where Adam trains in ten epochs; the epochs fixed, as successive halving spends them.
DEFAULT_SPACE: dict[str, Any] = {
    "learning_rate": {"low": 1e-4, "high": 3e-2, "log": True},
    "batch_size": [32, 64, 128],
    "hidden": [[64], [128, 64], [256, 128]],
    "weight_decay": [0.0, 1e-5, 1e-4, 1e-3],
    "dropout": [0.0, 0.1, 0.3],
}


class SpaceError(ValueError):
    """A search space that cannot be searched; the message names the parameter and what to change."""


def _checked(name: str, value: Any) -> Any:
    """`value` as a peer's setting `name`, or SpaceError saying why it is not one."""
    try:
        return check_hyperparameters({name: value})[name]
    except LimitError as exc:
        raise SpaceError(f"{name}: {exc}") from None


def _is_choices(name: str, value: Any) -> bool:
    if name == "hidden":  # [128, 64] is one architecture; [[64], [128, 64]] are two to choose from
        return isinstance(value, list) and bool(value) and all(isinstance(v, list) for v in value)
    return isinstance(value, list)


def _number(name: str, end: str, value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpaceError(f"{name}: {end} must be a number; got {value!r}")
    return value


def _range(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    if name not in NUMERIC:
        raise SpaceError(f"{name}: give a list of values to choose from (a range is for {', '.join(NUMERIC)})")
    unknown = sorted(set(spec) - {"low", "high", "log"})
    if unknown or "low" not in spec or "high" not in spec:
        raise SpaceError(f'{name}: a range is {{"low": …, "high": …, "log": true|false}}; got {dict(spec)!r}')
    low, high = _number(name, "low", spec["low"]), _number(name, "high", spec["high"])
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(f"{name}: log must be true or false; got {log!r}")
    whole = name in WHOLE
    if whole and not (isinstance(low, int) and isinstance(high, int)):
        raise SpaceError(f"{name}: a range of whole numbers; got {low!r} to {high!r}")
    low, high = _checked(name, low), _checked(name, high)
    if low >= high:
        raise SpaceError(f"{name}: low ({low:g}) must be below high ({high:g}); give one value to fix it")
    if log and low <= 0:
        raise SpaceError(f"{name}: a log range must start above 0; got low={low:g}")
    return {"low": low, "high": high, "log": log, "int": whole}


def _choices(name: str, values: list[Any]) -> dict[str, Any]:
    if not values:
        raise SpaceError(f"{name}: the list of values is empty")
    if len(values) > MAX_CHOICES:
        raise SpaceError(f"{name}: at most {MAX_CHOICES} values to choose from; got {len(values)}")
    checked = [_checked(name, value) for value in values]
    unique = [v for i, v in enumerate(checked) if v not in checked[:i]]
    return {"choices": unique} if len(unique) > 1 else {"value": unique[0]}


def parse(space: Any, fixed: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The normal form of a search space: every setting a peer needs, each `{"value": v}`, `{"choices": [...]}`
    or `{"low", "high", "log", "int"}`; settings the space leaves out take `fixed`'s values (else the
    defaults). SpaceError when it is not a space, asks for more than the limits allow, or varies nothing."""
    if not isinstance(space, dict):
        raise SpaceError('give the search space as a JSON object, e.g. {"learning_rate": {"low": 1e-4, '
                         '"high": 1e-1, "log": true}, "batch_size": [32, 64, 128]}')
    unknown = sorted(set(space) - set(SEARCHABLE))
    if unknown:
        raise SpaceError(f"{unknown[0]}: not a setting a search can vary; those are {', '.join(SEARCHABLE)}")
    base = {**DEFAULTS, **(fixed or {})}
    parsed: dict[str, dict[str, Any]] = {}
    for name in SEARCHABLE:
        value = space.get(name, base[name])
        if isinstance(value, dict):
            parsed[name] = _range(name, value)
        elif _is_choices(name, value) and name in space:
            parsed[name] = _choices(name, value)
        else:
            parsed[name] = {"value": _checked(name, value)}
    if all("value" in dimension for dimension in parsed.values()):
        raise SpaceError("the search space varies nothing: give at least one setting a list of values or a range")
    return parsed


def default_space(fixed: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The space a sweep searches when its user gave no settings (`fixed`: settings held at one value)."""
    return parse({k: v for k, v in DEFAULT_SPACE.items() if k not in (fixed or {})}, fixed)


def encode(name: str, value: Any) -> Any:
    """A value as a sampler's categorical choice (which holds only numbers, strings and None)."""
    return json.dumps(value) if name == "hidden" else value


def decode(name: str, value: Any) -> Any:
    return json.loads(value) if name == "hidden" and isinstance(value, str) else value


def hyperparameters(space: Mapping[str, Mapping[str, Any]], sampled: Mapping[str, Any]) -> dict[str, Any]:
    """A peer's settings: the space's fixed values and a trial's sampled ones (decoded), within the limits."""
    values = {name: dimension["value"] for name, dimension in space.items() if "value" in dimension}
    values.update({name: decode(name, value) for name, value in sampled.items()})
    return check_hyperparameters(values)


def max_epochs(space: Mapping[str, Mapping[str, Any]]) -> int:
    """The most epochs a trial of `space` may train."""
    epochs = space["epochs"]
    return int(epochs.get("value") or epochs.get("high") or max(epochs["choices"]))


def min_resource(space: Mapping[str, Mapping[str, Any]]) -> int:
    """The first rung: so that the longest trial is scored at most `MAX_RUNGS` times."""
    return max(1, math.ceil(max_epochs(space) / REDUCTION ** (MAX_RUNGS - 1)))


def rungs(epochs: int, first: int, pruned: bool = True) -> list[int]:
    """The epochs at which a trial of `epochs` epochs pauses to be scored; its last epoch is the last of them.
    Without a pruner, only the last."""
    points = []
    rung = first
    while pruned and rung < epochs:
        points.append(rung)
        rung *= REDUCTION
    return [*points, epochs]
