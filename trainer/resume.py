"""A training caught between two epochs, to go on later as if it had never stopped (Lightning's `ckpt_path`).

What the next epoch depends on is all here: the model's weights, the optimizer's state (Adam's moments
and step count, SGD's momentum), the shuffling generator's and torch's global generator's states (batch
order and dropout), and the epochs done with their measures. `trainer.loop.train` takes one as `resume`
and gives one to `on_checkpoint` every `checkpoint_every` epochs; on the CPU the resumed curve is the
uninterrupted one, bit for bit (tests/trainer/test_resume.py).

The file is safetensors with a JSON description, never pickle: a peer reads back only what it wrote,
but whatever it reads is checked against the model and optimizer it builds itself. The optimizer's
settings are not in the file at all: they come from the task's hyperparameters, as the first time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from trainer.model import ModelConfig
from trainer.weights import TRAINING_FORMAT, WeightsError, _pack, _tensors, _unpack, check_state

# What each optimizer keeps per parameter: a tensor of the parameter's shape, or a scalar.
_PER_PARAMETER = {"exp_avg", "exp_avg_sq", "momentum_buffer", "max_exp_avg_sq"}
_SCALAR = {"step"}
# An epoch's measures as trainer.loop.EpochMetrics has them (all of them required there).
_MEASURES = ("epoch", "epochs", "loss", "accuracy", "val_loss", "val_accuracy", "val_r2", "samples_per_sec", "seconds")


@dataclass
class TrainingState:
    """Where a training stands after `epoch` epochs."""

    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[int, dict[str, torch.Tensor]]  # parameter index -> its state (as Optimizer.state_dict()["state"])
    shuffler: torch.Tensor  # torch.Generator.get_state()
    rng: torch.Tensor  # torch.get_rng_state(): dropout's generator
    history: list[dict[str, Any]] = field(default_factory=list)  # EpochMetrics.to_dict() of each epoch done


def to_bytes(state: TrainingState) -> bytes:
    tensors = {f"model.{key}": value.detach().to("cpu").contiguous() for key, value in state.model.items()}
    for index, entries in state.optimizer.items():
        for name, value in entries.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().to("cpu").contiguous()
    tensors["rng.shuffler"] = state.shuffler.contiguous()
    tensors["rng.torch"] = state.rng.contiguous()
    return _pack(tensors, TRAINING_FORMAT, {"epoch": state.epoch, "history": state.history})


def from_bytes(data: bytes, config: ModelConfig, epochs: int) -> TrainingState:
    """A state written by `to_bytes` for a model of `config` trained `epochs` in all; WeightsError if it is not."""
    description = _unpack(data, TRAINING_FORMAT)
    if not isinstance(description, dict):
        raise WeightsError("the training state's description is not a JSON object")
    epoch, history = description.get("epoch"), description.get("history")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 1 <= epoch < epochs:
        raise WeightsError(f"the training state's epoch must be a whole number from 1 to {epochs - 1}")
    if not isinstance(history, list) or len(history) != epoch or not all(isinstance(h, dict) for h in history):
        raise WeightsError("the training state's history must hold one object per epoch done")
    tensors = _tensors(data)
    model = check_state({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}, config)
    shapes = list(config.parameter_shapes().values())
    optimizer: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith("optimizer."):
            continue
        _, index, name = key.split(".", 2)
        if not index.isdigit() or int(index) >= len(shapes):
            raise WeightsError(f"{key} names no parameter of this model")
        if name in _PER_PARAMETER:
            wanted = shapes[int(index)]
        elif name in _SCALAR:
            wanted = ()
        else:
            raise WeightsError(f"{key} is not optimizer state this trainer keeps")
        finite = value.is_floating_point() and bool(torch.isfinite(value).all())
        if tuple(value.shape) != tuple(wanted) or not finite:
            raise WeightsError(f"{key} must be finite floats of shape {list(wanted)}")
        optimizer.setdefault(int(index), {})[name] = value
    generators = {}
    for key, fresh in (("rng.shuffler", torch.Generator().get_state()), ("rng.torch", torch.get_rng_state())):
        value = tensors.get(key)
        if value is None or value.dtype != torch.uint8 or value.shape != fresh.shape:
            raise WeightsError(f"{key} is not a random generator's state")
        generators[key] = value
    for number, entry in enumerate(history, start=1):
        values = [entry.get(name) for name in _MEASURES]
        if (entry.get("epoch") != number or any(name not in entry for name in _MEASURES)
                or not all(v is None or (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v))
                           for v in values)):
            raise WeightsError(f"the training state's history entry {number} is not that epoch's measures")
    return TrainingState(epoch=epoch, model=model, optimizer=optimizer, shuffler=generators["rng.shuffler"],
                         rng=generators["rng.torch"], history=history)


def max_bytes(config: ModelConfig, epochs: int) -> int:
    """The most bytes a state of a model of `config` can take: the weights three times over (Adam's two
    moments), the generators, and a history entry of up to 1 KiB per epoch."""
    parameters = sum(math.prod(shape) for shape in config.parameter_shapes().values())
    return 3 * 4 * parameters + 64 * len(config.parameter_shapes()) * 3 + (64 << 10) + epochs * 1024
