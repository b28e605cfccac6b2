"""SCAFFOLD (Karimireddy et al., 2020): control variates that correct each peer's drift on skewed data.

The server keeps a control variate c (where the peers' data pulls on average) and one per peer, c_i (where
that peer's own data pulls). A peer trains with every local step moved by −η·(c − c_i) (trainer/loop.py
`correction`), so that its steps follow the federation's direction rather than its shard's alone.

Everything a peer could lie about is kept out of the server's side: a peer sends only its weights, y_i,
which are screened as any update is; its new control variate is computed by the coordinator from what the
coordinator itself knows (the weights x it sent, the correction it sent, the number of local steps K the
task's rows, batch size and epochs make, the learning rate η it asked for), by the paper's "option II":

    c_i+ = (x − y_i) / (K·η) − (c − c_i)

and c, the rows-weighted mean of the c_i, moves by the used peers' Δc_i = c_i+ − c_i. A hostile peer can
therefore move c only as far as its screened weights move the aggregate. Pure torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

State = Mapping[str, torch.Tensor]


def local_steps(rows: int, batch_size: int, epochs: int) -> int:
    """How many optimizer steps a task of `epochs` over `rows` rows in batches of `batch_size` makes."""
    if rows < 1 or batch_size < 1 or epochs < 1:
        raise ValueError(f"rows, batch size and epochs must be at least 1; got {rows}, {batch_size}, {epochs}")
    return epochs * math.ceil(rows / batch_size)


def zeros(like: State) -> dict[str, torch.Tensor]:
    """A control variate of zeros (every control variate starts so), shaped as the model's floating tensors."""
    return {key: torch.zeros_like(value, dtype=torch.float32) for key, value in like.items()}


def correction(server: State, peer: State | None) -> dict[str, torch.Tensor]:
    """What a peer's task applies at every step: c − c_i (c_i None: the peer has none yet, zeros)."""
    return {key: (c - peer[key]) if peer is not None else c.clone() for key, c in server.items()}


def control_after(sent: State, trained: State, applied: State, steps: int, lr: float) -> dict[str, torch.Tensor]:
    """The peer's new control variate c_i+ = (x − y_i)/(K·η) − (c − c_i), from the weights `sent` (x), the
    peer's screened weights `trained` (y_i) and the correction `applied` (c − c_i) its task was given."""
    if steps < 1 or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"steps must be at least 1 and the learning rate above 0; got {steps}, {lr}")
    scale = 1.0 / (steps * lr)
    return {key: ((x.double() - trained[key].double()) * scale - applied[key].double()).float()
            for key, x in sent.items()}


def server_after(server: State, combined: State, share: float) -> dict[str, torch.Tensor]:
    """c after a round: c + share·combine(Δc_i), `combined` the used peers' deltas combined by the session's rule and
    `share` their part of the session (the paper's |S|/N; the platform weighs peers by their rows, as FedAvg does,
    so c stays the rows-weighted mean of the peers' c_i: a peer holding most of a class pulls c as far as its rows)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"the used peers' share must be from 0 to 1; got {share}")
    return {key: c + share * combined[key] for key, c in server.items()}


def delta(after: State, before: State | None) -> dict[str, torch.Tensor]:
    """Δc_i = c_i+ − c_i (c_i None: zeros)."""
    return {key: value - before[key] if before is not None else value.clone() for key, value in after.items()}
