"""SimpleDNN: a multilayer perceptron built from a small dataclass config."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

TASKS = ("classification", "regression")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a SimpleDNN; output_size is the number of classes (1 for regression)."""

    input_size: int
    output_size: int
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.0
    task: str = "classification"

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.input_size < 1 or self.output_size < 1 or any(h < 1 for h in self.hidden):
            raise ValueError(
                f"layer sizes must be positive: input {self.input_size}, hidden {list(self.hidden)}, "
                f"output {self.output_size}"
            )
        if not (math.isfinite(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be at least 0 and below 1; got {self.dropout}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}; got {self.task!r}")
        if self.task == "classification" and self.output_size < 2:
            raise ValueError("classification needs an output per class, at least 2")

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """The state_dict keys of a SimpleDNN built from this config, with their shapes."""
        shapes: dict[str, tuple[int, ...]] = {}
        sizes = [self.input_size, *self.hidden, self.output_size]
        for layer, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
            index = layer * self._stride()  # position of the Linear in the Sequential
            shapes[f"layers.{index}.weight"] = (fan_out, fan_in)
            shapes[f"layers.{index}.bias"] = (fan_out,)
        return shapes

    def _stride(self) -> int:
        return 3 if self.dropout > 0 else 2  # Linear, ReLU[, Dropout]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        data = asdict(self)
        data["hidden"] = list(self.hidden)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Rebuild from `to_dict()` output."""
        return cls(
            input_size=int(data["input_size"]),
            output_size=int(data["output_size"]),
            hidden=tuple(int(h) for h in data.get("hidden", (128, 64))),
            dropout=float(data.get("dropout", 0.0)),
            task=str(data.get("task", "classification")),
        )


class SimpleDNN(nn.Module):
    """Linear -> ReLU (-> Dropout) per hidden layer, then a Linear to the outputs (logits or a value)."""

    def __init__(self, config: ModelConfig, seed: int | None = 0) -> None:
        super().__init__()
        self.config = config
        # nn.Linear draws its default init from torch's global generator: when we seed our own, keep the
        # caller's global generator untouched.
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            self.layers = nn.Sequential(*self._layers(config))
        if seed is not None:
            self.reset_parameters(seed)

    @staticmethod
    def _layers(config: ModelConfig) -> list[nn.Module]:
        layers: list[nn.Module] = []
        sizes = [config.input_size, *config.hidden]
        for fan_in, fan_out in zip(sizes, sizes[1:], strict=False):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU(inplace=True)]
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
        layers.append(nn.Linear(sizes[-1], config.output_size))
        return layers

    def reset_parameters(self, seed: int) -> None:
        """PyTorch's default Linear initialisation, drawn from a generator seeded with `seed`."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in self.layers:
                if isinstance(module, nn.Linear):
                    nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                    bound = 1 / math.sqrt(module.in_features)
                    nn.init.uniform_(module.bias, -bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [batch, input_size] -> [batch, output_size]."""
        return self.layers(x)
