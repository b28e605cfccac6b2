"""Paying a process's first-use costs up front: the first training, CSV read and weights round trip.

A fresh process spends ~0.8 s in its first `train` call (torch's autograd engine, the optimizers, the
kernels it picks), and more in its first CSV parse and safetensors round trip; later calls pay
nothing of it, whatever the shapes (measured: a 4-feature warm-up made the next 40 x 128 x 64 model's
first training 0.04 s instead of 0.86 s). A worker that calls `warm_up` when it starts makes its first
session as fast as the ones after it.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from trainer.loop import TrainConfig, evaluate, train
from trainer.model import ModelConfig, SimpleDNN
from trainer.table import read_table
from trainer.weights import state_from_bytes, state_to_bytes

_done = False
_lock = threading.Lock()


def warm_up() -> float:
    """Exercise training, evaluation, CSV reading and weights (de)serialisation once; seconds it took (0: done).

    On one torch thread: a worker calls it before it forks its pool, and a process that forks must not
    have started a pool of compute threads (the child would inherit a pool without its threads)."""
    global _done
    with _lock:
        if _done:
            return 0.0
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            seconds = _exercise()
        finally:
            torch.set_num_threads(threads)
        _done = True
        return seconds


def _exercise() -> float:
    began = time.perf_counter()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)  # [rows, features]
    y = (x[:, 0] > 0).astype(np.int64)
    with tempfile.TemporaryDirectory(prefix="peertrain-warmup-") as tmp:
        path = Path(tmp) / "warmup.csv"
        rows = "".join(",".join(map(str, row)) + f",{label}\n" for row, label in zip(x, y, strict=True))
        path.write_text("a,b,c,d,label\n" + rows)
        table = read_table(path, target="label")
    for task, target in (("classification", table.y), ("regression", x[:, 1])):
        config = ModelConfig(4, 2 if task == "classification" else 1, (8,), 0.1, task)
        model = SimpleDNN(config, seed=0)
        for optimizer in ("adam", "sgd"):
            train(model, table.x, target, TrainConfig(batch_size=16, epochs=1, learning_rate=0.01, optimizer=optimizer,
                                                      num_threads=1), table.x, target)
        evaluate(model, table.x, target)
        model.load_state_dict(state_from_bytes(state_to_bytes(model.state_dict()), config))
    return time.perf_counter() - began
