"""A peer whose returned weights are corrupted, as a broken or malicious machine's would be.

Start it like any peer, with `-A tests.e2e.faulty_peer`; PEERTRAIN_TEST_FAULT says how it lies:
`nan` (non-finite weights, which validation rejects) or `noise` (finite but huge, which only a
robust aggregation outvotes).
"""

from __future__ import annotations

import os

import torch

from tasks import training
from tasks.celery import app

__all__ = ["app"]

FAULT = os.environ.get("PEERTRAIN_TEST_FAULT", "nan")
_honest_weights = training._weights


def _corrupted_weights(spec, model, data, history):
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if FAULT == "nan":
                tensor.fill_(float("nan"))
            else:
                tensor.normal_(0.0, 1000.0)
    return _honest_weights(spec, model, data, history)


training._weights = _corrupted_weights
