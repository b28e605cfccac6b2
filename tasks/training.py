"""The peer's task: fetch the data, train with `trainer`, report each epoch, store the weights.

It runs on peer machines, which hold no database credentials: progress leaves as Celery events
(`task-heartbeat`, persisted by the monitor), the result as the task's return value.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from celery import Task

from settings import Settings
from tasks.cancellation import stop_check
from tasks.celery import app
from tasks.storage import from_settings
from trainer.dataset import Dataset, prepare
from trainer.loop import EpochMetrics, TrainConfig
from trainer.loop import train as fit
from trainer.memory import keep_freed_memory
from trainer.model import ModelConfig, SimpleDNN
from trainer.normalization import Normalization
from trainer.table import read_table
from trainer.weights import Checkpoint, checkpoint_bytes, state_from_bytes, state_to_bytes

log = logging.getLogger(__name__)

HEARTBEAT = "task-heartbeat"


@cache
def _settings() -> Settings:
    return Settings.from_env()


@cache
def _storage():
    return from_settings(_settings())


@app.task(name="peertrain.train", bind=True)
def train(self: Task, spec: dict[str, Any]) -> dict[str, Any]:
    """Train one peer's model as `spec` says (built by the coordinator) and return a small JSON result."""
    session, peer, round_ = spec["session"], spec["peer"], spec.get("round", 0)
    should_stop = stop_check(self.app, session)
    result = {"peer": peer, "round": round_, "samples": 0, "final": {}, "history": [], "weights_url": None,
              "bytes_fetched": 0, "seconds": 0.0, "stopped": True}
    if should_stop():
        return result  # redelivered after the session ended (this peer restarted, say): nothing to do
    if _settings().peer_keep_memory:
        keep_freed_memory()  # process-wide and idempotent: a peer's reads and shuffles reuse its memory

    data, result["bytes_fetched"] = _fetch(spec)
    model = _model(spec, data)
    initial = None
    if spec.get("initial_weights_url"):
        initial = state_from_bytes(_storage().get_bytes(spec["initial_weights_url"]), model.config)

    def report(metrics: EpochMetrics) -> None:
        self.send_event(HEARTBEAT, session=session, peer=peer, round=round_, **metrics.to_dict())

    hp = spec["hyperparameters"]
    config = TrainConfig(
        batch_size=hp["batch_size"], epochs=hp["epochs"], learning_rate=hp["learning_rate"],
        optimizer=hp.get("optimizer", "adam"), seed=spec.get("seed", 0), num_threads=_settings().peer_threads,
    )
    trained = fit(model, data.train_x, data.train_y, config, data.val_x, data.val_y,
                  on_epoch_end=report, should_stop=should_stop, initial_state=initial)
    weights = _weights(spec, trained.model, data, trained.history)
    result.update(
        samples=len(data.train_y),
        final=trained.final.to_dict() if trained.final else {},
        # The authoritative per-epoch record: the coordinator stores it, so a finished session has
        # every heartbeat even if some events were lost on the way to the monitor.
        history=[m.to_dict() for m in trained.history],
        weights_url=_storage().put_bytes(spec["weights_key"], weights),
        seconds=trained.seconds,
        stopped=trained.stopped,
        device=trained.metadata.get("device"),
    )
    return result


def _fetch(spec: dict[str, Any]) -> tuple[Dataset, int]:
    """The peer's data, read and validated, and how many bytes were downloaded for it."""
    if spec.get("keep_data"):
        # A federated shard is the same every round: fetch it once, drop it after the last round.
        cache = ShardCache(Path(tempfile.gettempdir()) / "peertrain-shards" / spec["peer"])
        path, fetched = cache.fetch(_storage(), spec["data_url"])
        data = _dataset(spec, path)
        if spec.get("last_round"):
            cache.drop(spec["data_url"])
        return data, fetched
    with tempfile.TemporaryDirectory(prefix="peertrain-") as tmp:
        path = Path(tmp) / "data.csv"
        fetched = _storage().download(spec["data_url"], path)
        return _dataset(spec, path), fetched


def _model(spec: dict[str, Any], data: Dataset) -> SimpleDNN:
    hp = spec["hyperparameters"]
    return SimpleDNN(ModelConfig(input_size=len(data.table.features), output_size=data.table.output_size,
                                 hidden=tuple(hp["hidden"]), dropout=hp.get("dropout", 0.0), task=data.table.task),
                      seed=spec.get("seed", 0))


class ShardCache:
    """Files fetched from storage, kept under one directory by URL (objects never change once written)."""

    def __init__(self, root: Path, keep: int = 8) -> None:
        self.root = root
        self.keep = keep

    def _path(self, url: str) -> Path:
        return self.root / f"{hashlib.sha256(url.encode()).hexdigest()[:32]}.csv"

    def fetch(self, storage, url: str) -> tuple[Path, int]:
        """The local copy of `url` and how many bytes this call downloaded (0 when it was cached)."""
        path = self._path(url)
        if path.exists():
            path.touch()
            return path, 0
        self.root.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.part")
        fetched = storage.download(url, partial)
        os.replace(partial, path)
        # Sessions that ended early leave shards behind: keep only the most recently used few.
        for stale in sorted(self.root.glob("*.csv"), key=lambda p: p.stat().st_mtime)[:-self.keep]:
            stale.unlink(missing_ok=True)
        return path, fetched

    def drop(self, url: str) -> None:
        self._path(url).unlink(missing_ok=True)


def _dataset(spec: dict[str, Any], path: Path) -> Dataset:
    table = read_table(path, target=spec["target"], features=spec["features"], task=spec["task"],
                       classes=spec.get("classes"))
    if spec.get("normalization"):
        # A federated shard: the whole file is training data, scaled like every other peer's.
        return Dataset.from_indices(table, np.arange(table.rows), None,
                                    Normalization.from_dict(spec["normalization"]))
    return prepare(table, spec.get("validation_fraction", 0.2), seed=spec.get("seed", 0),
                   stratify=table.classes is not None)


def _weights(spec: dict[str, Any], model: SimpleDNN, data: Dataset, history: list[EpochMetrics]) -> bytes:
    if spec.get("normalization"):
        return state_to_bytes(model.state_dict(), {"peer": spec["peer"], "round": spec.get("round", 0)})
    checkpoint = Checkpoint(
        config=model.config,
        features=data.table.features,
        target=data.table.target,
        classes=data.table.classes,
        normalization=data.normalization,
        metadata={"session": spec["session"], "peer": spec["peer"], "hyperparameters": spec["hyperparameters"],
                  "history": [m.to_dict() for m in history]},
    )
    return checkpoint_bytes(model, checkpoint)
