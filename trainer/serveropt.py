"""Federated optimizers: which algorithm a federated session combines its peers' work with.

`fedavg` takes the (robust) aggregate of the peers' weights as the new global model. The FedOpt family
(Reddi et al., 2021) treats the aggregate's move from the global weights, Δ, as a pseudo-gradient for an
optimizer on the server: `fedavgm` (server momentum, Hsu et al., 2019), `fedadam` and `fedyogi` (adaptive,
with the second moments started at τ²). `fedprox` (Li et al., 2020) changes the peers' side instead: each
local training adds (μ/2)·‖w − w_global‖² to its loss (trainer/loop.py `TrainConfig.proximal_mu`); the
server averages as FedAvg does.

The server's state (momentum, second moments) is a dict of tensors that `step` returns and takes back; the
coordinator keeps it with the session (`state_to_bytes`), so a coordinator that restarts goes on with it.
Pure torch and safetensors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

ALGORITHMS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedprox", "scaffold")
SERVER = ("fedavgm", "fedadam", "fedyogi")  # the ones with a server optimizer (and state)
FORMAT = "peertrain.server-optimizer.v1"


@dataclass(frozen=True)
class ServerOptimizer:
    """A server optimizer's settings. The defaults follow the papers' recommendations for small models."""

    algorithm: str
    lr: float | None = None  # None: DEFAULT_LR[algorithm]
    momentum: float = 0.9  # fedavgm's β; fedadam's and fedyogi's β1
    beta2: float = 0.99
    tau: float = 1e-3  # the adaptive ones' ε: how small a second moment may make a step large

    def __post_init__(self) -> None:
        if self.algorithm not in SERVER:
            raise ValueError(f"{self.algorithm!r} has no server optimizer; those are {', '.join(SERVER)}")

    @property
    def rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.algorithm]

    def step(self, current: Mapping[str, torch.Tensor], aggregate: Mapping[str, torch.Tensor],
             state: Mapping[str, torch.Tensor] | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The new global weights, and the optimizer's state after this step, from the current global weights,
        the round's aggregate and the state before it (None: the first step)."""
        state = dict(state or {})
        new, after = {}, {}
        for key, weights in current.items():
            if not torch.is_floating_point(weights):
                new[key] = aggregate[key].clone()  # a counter, not a parameter: taken as aggregated
                continue
            delta = aggregate[key].double() - weights.double()
            m = state.get(f"m.{key}", torch.zeros_like(delta)).double()
            if self.algorithm == "fedavgm":
                m = self.momentum * m + delta
                move = self.rate * m
            else:
                m = self.momentum * m + (1 - self.momentum) * delta
                v = state.get(f"v.{key}", torch.full_like(delta, self.tau ** 2)).double()
                squared = delta * delta
                if self.algorithm == "fedadam":
                    v = self.beta2 * v + (1 - self.beta2) * squared
                else:  # fedyogi: the second moment moves towards Δ² by at most (1 - β2)·Δ² a step
                    v = v - (1 - self.beta2) * squared * torch.sign(v - squared)
                after[f"v.{key}"] = v
                move = self.rate * m / (v.sqrt() + self.tau)
            after[f"m.{key}"] = m
            new[key] = (weights.double() + move).to(weights.dtype)
        return new, after


DEFAULT_LR = {"fedavgm": 1.0, "fedadam": 0.01, "fedyogi": 0.01}


def state_to_bytes(state: Mapping[str, torch.Tensor], optimizer: ServerOptimizer) -> bytes:
    """The server optimizer's state as safetensors, naming the optimizer it belongs to."""
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
    return save_tensors(tensors, metadata={"format": FORMAT, "algorithm": optimizer.algorithm,
                                           "settings": json.dumps({"lr": optimizer.rate})})


def state_from_bytes(data: bytes, current: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read `state_to_bytes` output (written by the coordinator itself), checked against the model's shapes."""
    tensors = load_tensors(data)
    for key, value in tensors.items():
        name = key.split(".", 1)[1] if "." in key else key
        if name not in current or value.shape != current[name].shape or not torch.isfinite(value).all():
            raise ValueError(f"the server optimizer's state does not fit the model ({key})")
    return tensors
