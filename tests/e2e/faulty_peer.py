"""A peer that lies, as a broken or malicious machine would. Start it like any peer, with
`-A tests.e2e.faulty_peer`; PEERTRAIN_TEST_FAULT says how:

- `nan`: uploads non-finite weights (validation rejects them);
- `noise`: uploads finite but huge weights (only a robust aggregation outvotes them);
- `claims`: trains honestly but its result claims 10^12 samples, perfect metrics, another peer's
  name and weights somewhere else;
- `keep`: trains honestly and writes its tasks' specs (grants included) to PEERTRAIN_TEST_KEEP, to
  use them after its session has ended.
"""

from __future__ import annotations

import json
import os

import torch

from tasks import training
from tasks.peer import app

__all__ = ["app"]

FAULT = os.environ.get("PEERTRAIN_TEST_FAULT", "nan")
_honest_bytes, _honest_run = training.state_to_bytes, training.run


def _corrupted(state, metadata=None):
    with torch.no_grad():
        for tensor in state.values():
            if FAULT == "nan":
                tensor.fill_(float("nan"))
            else:
                tensor.normal_(0.0, 1000.0)
    return _honest_bytes(state, metadata)


def _lying_run(task, spec, notices, settings, kept=None):
    if FAULT == "keep":
        with open(os.environ["PEERTRAIN_TEST_KEEP"], "a") as out:
            out.write(json.dumps(spec) + "\n")
    result = _honest_run(task, spec, notices, settings, kept)
    if FAULT == "claims":
        result.update(samples=10**12, peer="someone-else", weights_url="s3://elsewhere/weights.safetensors")
        result["final"] = {**result["final"], "val_accuracy": 1.0, "val_loss": 0.0}
    return result


if FAULT in ("nan", "noise"):
    training.state_to_bytes = _corrupted
else:
    training.run = _lying_run
