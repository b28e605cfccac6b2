"""What one training may ask for: the API refuses more, and so does every peer before it trains.

Torch-free, so the web API's request schemas and the peers share one set of numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

MAX_EPOCHS = 1000
MAX_BATCH_SIZE = 65536
MAX_HIDDEN_LAYERS = 8
MAX_HIDDEN_UNITS = 4096
MAX_LEARNING_RATE = 10.0
MAX_DROPOUT = 0.9
MAX_WEIGHT_DECAY = 1.0
MAX_ROWS = 10_000_000
MAX_FEATURES = 100_000
OPTIMIZERS = ("adam", "sgd")

DEFAULTS: dict[str, Any] = {"batch_size": 64, "epochs": 10, "learning_rate": 0.001, "hidden": [128, 64],
                            "optimizer": "adam", "dropout": 0.0, "weight_decay": 0.0}


class LimitError(ValueError):
    """A training asks for more than the platform allows."""


def _int(hp: Mapping[str, Any], key: str, low: int, high: int) -> int:
    value = hp[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise LimitError(f"{key} must be a whole number from {low} to {high}; got {value!r}")
    return value


def _float(hp: Mapping[str, Any], key: str, low: float, high: float, low_inclusive: bool) -> float:
    value = hp[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise LimitError(f"{key} must be a number; got {value!r}")
    if value > high or value < low or (value == low and not low_inclusive):
        bound = "at least" if low_inclusive else "above"
        raise LimitError(f"{key} must be {bound} {low:g} and at most {high:g}; got {value!r}")
    return float(value)


def check_hyperparameters(hp: Mapping[str, Any]) -> dict[str, Any]:
    """`hp` with defaults filled in, or LimitError naming the first value out of range or unknown."""
    unknown = sorted(set(hp) - set(DEFAULTS))
    if unknown:
        raise LimitError(f"unknown hyperparameter {unknown[0]!r}; the known ones are {', '.join(DEFAULTS)}")
    hp = {**DEFAULTS, **hp}
    hidden = hp["hidden"]
    if not isinstance(hidden, list | tuple) or len(hidden) > MAX_HIDDEN_LAYERS:
        raise LimitError(f"hidden must be a list of at most {MAX_HIDDEN_LAYERS} layer sizes; got {hidden!r}")
    for units in hidden:
        if isinstance(units, bool) or not isinstance(units, int) or not 1 <= units <= MAX_HIDDEN_UNITS:
            raise LimitError(f"each hidden layer must have 1 to {MAX_HIDDEN_UNITS} units; got {units!r}")
    if hp["optimizer"] not in OPTIMIZERS:
        raise LimitError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {hp['optimizer']!r}")
    return {
        "batch_size": _int(hp, "batch_size", 1, MAX_BATCH_SIZE),
        "epochs": _int(hp, "epochs", 1, MAX_EPOCHS),
        "learning_rate": _float(hp, "learning_rate", 0.0, MAX_LEARNING_RATE, low_inclusive=False),
        "hidden": list(hidden),
        "optimizer": hp["optimizer"],
        "dropout": _float(hp, "dropout", 0.0, MAX_DROPOUT, low_inclusive=True),
        "weight_decay": _float(hp, "weight_decay", 0.0, MAX_WEIGHT_DECAY, low_inclusive=True),
    }


def check_table_size(rows: int, features: int) -> None:
    """LimitError when a dataset is larger than one training may take."""
    if rows > MAX_ROWS:
        raise LimitError(f"the dataset has {rows:,} rows; at most {MAX_ROWS:,} are accepted")
    if features > MAX_FEATURES:
        raise LimitError(f"the dataset has {features:,} feature columns; at most {MAX_FEATURES:,} are accepted")
