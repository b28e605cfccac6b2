"""A peer that lies, as a broken or malicious machine would. Start it like any peer, with
`-A tests.e2e.faulty_peer`; PEERTRAIN_TEST_FAULT says how:

- `nan`: uploads non-finite weights (validation rejects them);
- `noise`: uploads finite but huge weights (screening bounds them and names the peer, whatever the rule);
- `scale`: uploads its honest update a hundred times over;
- `silent`: trains, then never reports (its worker goes on beating: it looks alive);
- `claims`: trains honestly but its result claims 10^12 samples, perfect metrics, another peer's
  name and weights somewhere else;
- `keep`: trains honestly and writes its tasks' specs (grants included) to PEERTRAIN_TEST_KEEP, to
  use them after its session has ended.
"""

from __future__ import annotations

import json
import os
import time

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


def _scaled_run(task, spec, notices, settings, kept=None):
    """Train honestly, but upload start + 100 x (trained - start): its update a hundred times over."""
    from trainer.model import ModelConfig
    from trainer.weights import max_state_bytes, state_from_bytes

    hp = spec["hyperparameters"]
    config = ModelConfig(len(spec["features"]), len(spec["classes"]), tuple(hp["hidden"]), hp["dropout"], spec["task"])

    def upload(url, data):
        trained = state_from_bytes(data, config)
        start = state_from_bytes(training.transfer.fetch(spec["initial_weights"], max_state_bytes(config)), config)
        _upload(url, _honest_bytes({k: start[k] + 100 * (v - start[k]) for k, v in trained.items()}))

    training.transfer.upload = upload
    try:
        return _honest_run(task, spec, notices, settings, kept)
    finally:
        training.transfer.upload = _upload


def _silent_run(task, spec, notices, settings, kept=None):
    """Train, then hold the task forever: the worker beats on, the task never ends."""
    _honest_run(task, spec, notices, settings, kept)
    while True:
        time.sleep(60)


def _lying_run(task, spec, notices, settings, kept=None):
    if FAULT == "keep":
        with open(os.environ["PEERTRAIN_TEST_KEEP"], "a") as out:
            out.write(json.dumps(spec) + "\n")
    result = _honest_run(task, spec, notices, settings, kept)
    if FAULT == "claims":
        result.update(samples=10**12, peer="someone-else", weights_url="s3://elsewhere/weights.safetensors")
        result["final"] = {**result["final"], "val_accuracy": 1.0, "val_loss": 0.0}
    return result


_upload = training.transfer.upload
if FAULT in ("nan", "noise"):
    training.state_to_bytes = _corrupted
elif FAULT == "scale":
    training.run = _scaled_run
elif FAULT == "silent":
    training.run = _silent_run
else:
    training.run = _lying_run
