"""A peer whose uploaded weights are corrupted, as a broken or malicious machine's would be.

Start it like any peer, with `-A tests.e2e.faulty_peer`; PEERTRAIN_TEST_FAULT says how it lies:
`nan` (non-finite weights, which validation rejects) or `noise` (finite but huge, which only a
robust aggregation outvotes).
"""

from __future__ import annotations

import os

import torch

from tasks import training
from tasks.peer import app

__all__ = ["app"]

FAULT = os.environ.get("PEERTRAIN_TEST_FAULT", "nan")
_honest = training.state_to_bytes


def _corrupted(state, metadata=None):
    with torch.no_grad():
        for tensor in state.values():
            if FAULT == "nan":
                tensor.fill_(float("nan"))
            else:
                tensor.normal_(0.0, 1000.0)
    return _honest(state, metadata)


training.state_to_bytes = _corrupted
