"""Safe model files (safetensors, never pickle): checkpoints that rebuild a model, raw states for rounds."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from trainer.aggregation import AggregationError, average, median, trimmed_mean
from trainer.model import ModelConfig, SimpleDNN
from trainer.normalization import Normalization

__all__ = [
    "CHECKPOINT_FORMAT",
    "METADATA_KEY",
    "STATE_FORMAT",
    "AggregationError",
    "Checkpoint",
    "WeightsError",
    "average",
    "check_state",
    "checkpoint_bytes",
    "load_checkpoint",
    "median",
    "read_metadata",
    "save_checkpoint",
    "state_from_bytes",
    "state_to_bytes",
    "trimmed_mean",
]

METADATA_KEY = "peertrain"  # the safetensors metadata entry holding our JSON
CHECKPOINT_FORMAT = "peertrain.checkpoint/1"
STATE_FORMAT = "peertrain.state/1"
TRAINING_FORMAT = "peertrain.training/1"  # a training caught between epochs (trainer/resume.py)
_MAX_HEADER = 16 * 1024 * 1024  # a SimpleDNN's header is a few hundred bytes; refuse absurd ones

State = Mapping[str, torch.Tensor]


class WeightsError(ValueError):
    """A model file or state that cannot be used: not safetensors, wrong shapes, non-finite values."""


@dataclass
class Checkpoint:
    """Everything besides the tensors needed to rebuild and use a trained model."""

    config: ModelConfig
    features: list[str]
    target: str
    classes: list[str] | None  # class labels in output order; None for regression
    normalization: Normalization
    metadata: dict[str, Any] = field(default_factory=dict)  # free-form JSON: session id, history, ...

    def __post_init__(self) -> None:
        config = self.config
        if len(self.features) != config.input_size or len(set(self.features)) != len(self.features):
            raise WeightsError(
                f"the checkpoint needs {config.input_size} distinct feature names; got {len(self.features)}"
            )
        if self.normalization.size != config.input_size:
            raise WeightsError(
                f"normalization has {self.normalization.size} features; the model takes {config.input_size}"
            )
        if config.task == "classification":
            if self.classes is None or len(self.classes) != config.output_size:
                raise WeightsError(
                    f"a classifier with {config.output_size} outputs needs {config.output_size} "
                    f"class labels; got {self.classes}"
                )
        elif self.classes is not None:
            raise WeightsError("a regression checkpoint has no class labels")

    @property
    def task(self) -> str:
        """classification or regression."""
        return self.config.task

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return {
            "config": self.config.to_dict(),
            "features": list(self.features),
            "target": self.target,
            "classes": None if self.classes is None else list(self.classes),
            "normalization": self.normalization.to_dict(),
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Checkpoint:
        """Rebuild from `to_dict()` output."""
        try:
            return cls(
                config=ModelConfig.from_dict(data["config"]),
                features=[str(f) for f in data["features"]],
                target=str(data["target"]),
                classes=None if data.get("classes") is None else [str(c) for c in data["classes"]],
                normalization=Normalization.from_dict(data["normalization"]),
                metadata=dict(data.get("metadata") or {}),
            )
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, WeightsError):
                raise
            raise WeightsError(f"the checkpoint's description is invalid: {error}") from error


def _json(data: Any) -> str:
    try:
        return json.dumps(data, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as error:
        raise WeightsError(f"metadata must be JSON with finite numbers: {error}") from error


def check_state(state: State, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The state as float32 CPU tensors, after checking keys and shapes against `config` and finiteness."""
    expected = config.parameter_shapes()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise WeightsError(
            f"the weights do not fit this model: missing {missing or 'none'}, "
            f"unexpected {unexpected or 'none'}"
        )
    checked: dict[str, torch.Tensor] = {}
    for key, shape in expected.items():
        tensor = state[key]
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise WeightsError(f"{key} must be a floating-point tensor")
        if tuple(tensor.shape) != shape:
            raise WeightsError(f"{key} has shape {list(tensor.shape)}; this model needs {list(shape)}")
        tensor = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if not bool(torch.isfinite(tensor).all()):
            raise WeightsError(f"{key} holds NaN or infinite values")
        checked[key] = tensor
    return checked


def _header(data: bytes) -> dict[str, Any]:
    """The safetensors JSON header, read without touching the tensors."""
    if len(data) < 8:
        raise WeightsError("not a safetensors file: too short")
    size = int.from_bytes(data[:8], "little")
    if size > min(_MAX_HEADER, len(data) - 8):
        raise WeightsError("not a safetensors file: bad header length")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, ValueError) as error:
        raise WeightsError("not a safetensors file: unreadable header") from error
    if not isinstance(header, dict):
        raise WeightsError("not a safetensors file: bad header")
    return header


def _pack(tensors: dict[str, torch.Tensor], kind: str, payload: Any) -> bytes:
    # One metadata entry only: safetensors writes several in a random order, and identical models
    # should give identical bytes.
    return save_tensors(tensors, metadata={METADATA_KEY: _json({"format": kind, "data": payload})})


def _unpack(data: bytes, kind: str | None = None) -> Any:
    """The JSON payload stored by _pack, after checking the file is ours (and of `kind`, if given)."""
    meta = _header(data).get("__metadata__") or {}
    try:
        document = json.loads(meta[METADATA_KEY])
        found = document["format"]
    except (KeyError, TypeError, ValueError):
        raise WeightsError("not a peertrain weights file: it has no peertrain description") from None
    if found not in (STATE_FORMAT, CHECKPOINT_FORMAT, TRAINING_FORMAT) or (kind is not None and found != kind):
        expected = "model checkpoint" if kind == CHECKPOINT_FORMAT else "weights file"
        raise WeightsError(f"not a peertrain {expected}: its format is {found!r}")
    return document.get("data")


def read_metadata(data: bytes) -> dict[str, Any]:
    """The JSON metadata stored with a state (state_to_bytes), or a checkpoint's description."""
    payload = _unpack(data)
    if not isinstance(payload, dict):
        raise WeightsError("the weights file's metadata is not a JSON object")
    return payload


def _tensors(data: bytes) -> dict[str, torch.Tensor]:
    try:
        return load_tensors(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise WeightsError(f"the weights file is damaged: {error}") from error


def max_state_bytes(config: ModelConfig, metadata_bytes: int = 64 << 10) -> int:
    """The most bytes state_to_bytes can take for a model of `config` (float32 tensors and a small header)."""
    tensors = sum(math.prod(shape) for shape in config.parameter_shapes().values())
    return 4 * tensors + 1024 * len(config.parameter_shapes()) + metadata_bytes


def state_to_bytes(state: State, metadata: Mapping[str, Any] | None = None) -> bytes:
    """A model state (e.g. a peer's round result) as safetensors bytes, with JSON metadata."""
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
    return _pack(tensors, STATE_FORMAT, dict(metadata or {}))


def state_from_bytes(data: bytes, expected: ModelConfig) -> dict[str, torch.Tensor]:
    """Read state_to_bytes output, checked against the model it must fit."""
    _unpack(data, STATE_FORMAT)  # rejects files that are not ours before reading tensors
    return check_state(_tensors(data), expected)


def checkpoint_bytes(model: SimpleDNN, checkpoint: Checkpoint) -> bytes:
    """A trained model and its description as safetensors bytes."""
    if model.config != checkpoint.config:
        raise WeightsError("the model was not built from the checkpoint's config")
    state = check_state(model.state_dict(), checkpoint.config)
    return _pack(state, CHECKPOINT_FORMAT, checkpoint.to_dict())


def save_checkpoint(
    destination: str | os.PathLike[str] | BinaryIO, model: SimpleDNN, checkpoint: Checkpoint
) -> None:
    """Write a checkpoint to a path (atomically: a reader never sees half a file) or a binary file."""
    data = checkpoint_bytes(model, checkpoint)
    if hasattr(destination, "write"):
        destination.write(data)
        return
    path = os.fspath(destination)
    folder = os.path.dirname(os.path.abspath(path))
    handle, partial = tempfile.mkstemp(dir=folder, prefix=".checkpoint-", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(partial, 0o644)  # mkstemp makes it owner-only; a model file is meant to be shared
        os.replace(partial, path)
    except BaseException:
        os.unlink(partial)
        raise


def _read(source: str | os.PathLike[str] | bytes | BinaryIO) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    if hasattr(source, "read"):
        return source.read()
    try:
        with open(source, "rb") as file:
            return file.read()
    except OSError as error:
        raise WeightsError(f"cannot read {os.fspath(source)}: {error.strerror}") from error


def load_checkpoint(source: str | os.PathLike[str] | bytes | BinaryIO) -> tuple[SimpleDNN, Checkpoint]:
    """The model (in eval mode, on the CPU) and its description, after checking shapes and values."""
    data = _read(source)
    description = _unpack(data, CHECKPOINT_FORMAT)
    if not isinstance(description, dict):
        raise WeightsError("the checkpoint's description is not a JSON object")
    checkpoint = Checkpoint.from_dict(description)
    state = check_state(_tensors(data), checkpoint.config)
    model = SimpleDNN(checkpoint.config)  # seeded init: leaves the global RNG alone
    model.load_state_dict(state)
    return model.eval(), checkpoint
