"""The peer's task: check the spec, fetch the data through its grant, train with `trainer`, report, upload.

It runs on peer machines, which hold no database or storage credentials: data and weights move
through the grants in the spec (tasks/transfer.py), progress leaves as Celery events
(`task-heartbeat`, verified and persisted by the monitor), the outcome as the task's return value,
which the peer's app reports to the coordinator (tasks/peer.py). The spec is checked against the
protocol's schema and the platform's limits before anything runs (tasks/protocol.py `train_spec`): a
peer does not train what the API would have refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from celery import Celery, Task
from celery.signals import worker_init

from settings import Settings
from tasks import protocol, transfer
from trainer import resume
from trainer.dataset import Dataset, prepare
from trainer.limits import check_table_size
from trainer.loop import EpochMetrics, TrainConfig
from trainer.loop import train as fit
from trainer.memory import keep_freed_memory
from trainer.model import ModelConfig, SimpleDNN
from trainer.normalization import Normalization
from trainer.split import VALIDATION_FRACTION, split_indices
from trainer.table import read_table
from trainer.warmup import warm_up
from trainer.weights import WeightsError, max_state_bytes, state_from_bytes, state_to_bytes

log = logging.getLogger(__name__)

# One quick retry: an epoch must not wait on a broker that is away.
EVENT_RETRY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
# A dataset or shard larger than this is refused before it fills the disk (the API takes 200 MiB by default).
MAX_DATA_BYTES = 4 << 30
SHARDS = Path(tempfile.gettempdir()) / "peertrain-shards"
STALE_SECONDS = 600


def register(app: Celery, settings: Settings) -> None:
    """Add the `train` task to a peer's app: acknowledged when done, killed past the time limit."""
    notices: list[protocol.StopNotices] = []
    kept = Rounds()
    # Pay torch's, pandas' and the trainer's first-use costs when the worker starts (before it forks its
    # pool and says it is online), not in its first task.
    worker_init.connect(_warm_up, weak=False, dispatch_uid="peertrain.peer.warm_up")
    # Outcomes of recent tasks: a message redelivered after a broker outage (it could not be acknowledged)
    # gets the same answer again at once instead of a second training.
    done: OrderedDict[str, dict[str, Any]] = OrderedDict()

    @app.task(name="peertrain.train", bind=True, shared=False, acks_late=True, time_limit=settings.train_time_limit,
              soft_time_limit=max(1, settings.train_time_limit - 30))
    def train(self: Task, spec: dict[str, Any]) -> dict[str, Any]:
        """Train one peer's model as `spec` says (built by the coordinator); return a small JSON result."""
        if self.request.id in done:
            return done[self.request.id]
        if not notices:
            notices.append(protocol.StopNotices(self.app, protocol.peer_of(protocol.identity(self.app)) or "unknown"))
        result = done[self.request.id] = run(self, protocol.train_spec(spec), notices[0], settings, kept)
        while len(done) > 16:
            done.popitem(last=False)
        return result


def run(task: Task, spec: dict[str, Any], notices: protocol.StopNotices, settings: Settings,
        kept: Rounds | None = None) -> dict[str, Any]:
    """Train as `spec` says and upload the weights; the result the peer reports."""
    kept = kept or Rounds()
    session, round_ = spec["session"], spec["round"]

    def should_stop() -> bool:
        return notices.reason(session, spec["attempt"]) is not None

    result = {"round": round_, "final": {}, "history": [], "bytes_fetched": 0, "seconds": 0.0, "stopped": True}
    if should_stop():
        return result  # queued before its session ended: nothing to do
    if settings.peer_keep_memory:
        keep_freed_memory()  # process-wide and idempotent: a peer's reads and shuffles reuse its memory

    data, model, result["bytes_fetched"] = kept.prepare(spec)
    initial = None
    if spec.get("initial_weights"):
        initial = state_from_bytes(transfer.fetch(spec["initial_weights"], max_state_bytes(model.config)),
                                   model.config)
    # SCAFFOLD's drift correction: model-shaped, written by the coordinator, checked as weights are.
    correction = (state_from_bytes(transfer.fetch(spec["correction"], max_state_bytes(model.config)), model.config)
                  if spec.get("correction") else None)
    name = protocol.peer_of(protocol.identity(task.app))
    unsent = 0

    def report(metrics: EpochMetrics) -> None:
        nonlocal unsent
        try:
            task.send_event(protocol.HEARTBEAT, retry=True, retry_policy=EVENT_RETRY,
                            **protocol.heartbeat_fields(session, name, round_, metrics.to_dict()))
        except Exception as exc:  # the broker is away: train on; the result carries every epoch anyway
            unsent += 1
            if unsent == 1:
                log.warning("heartbeats cannot be sent (%s); the result will carry them", exc)

    hp = spec["hyperparameters"]
    config = TrainConfig(batch_size=hp["batch_size"], epochs=hp["epochs"], learning_rate=hp["learning_rate"],
                         optimizer=hp["optimizer"], weight_decay=hp["weight_decay"], seed=spec["seed"],
                         num_threads=settings.peer_threads, proximal_mu=spec["proximal_mu"])
    caught = _caught(spec, model.config, config.epochs)
    if caught is not None:
        log.info("session %s: peer %s goes on from epoch %d (its checkpoint)", session, name, caught.epoch + 1)

    def checkpoint(state: resume.TrainingState) -> None:
        if should_stop():
            return
        try:
            # Once, mid-task: a missed checkpoint costs a resumed task a few epochs, a wait here costs every
            # task. At a pause (`until`) the next stretch of the trial goes on from it: worth a retry.
            transfer.upload(spec["checkpoint"], resume.to_bytes(state), retry=state.epoch == spec["until"])
        except Exception as exc:  # a checkpoint saves time later; it must not fail the training now
            log.warning("the checkpoint after epoch %d could not be uploaded: %s", state.epoch, exc)

    trained = fit(model, data.train_x, data.train_y, config, data.val_x, data.val_y,
                  on_epoch_end=report, should_stop=should_stop, initial_state=initial, resume=caught,
                  checkpoint_every=spec["checkpoint_every"] if spec.get("checkpoint") else 0,
                  on_checkpoint=checkpoint, until=spec["until"] or None, correction=correction)
    if trained.stopped:
        log.info("session %s: peer %s stopped after epoch %d: %s", session, name, len(trained.history),
                 notices.reason(session, spec["attempt"]))
    else:  # a stopped training's weights are of no use to anyone
        # Only the weights: the coordinator knows the rest of the model (shape, features, scaling) itself.
        transfer.upload(spec["weights"], state_to_bytes(trained.model.state_dict(), {"round": round_}))
    result.update(
        final=trained.final.to_dict() if trained.final else {},
        # The authoritative per-epoch record: the coordinator stores it, so a finished session has
        # every heartbeat even if some events were lost on the way to the monitor.
        history=[m.to_dict() for m in trained.history],
        seconds=trained.seconds,
        stopped=trained.stopped,
        device=trained.metadata.get("device"),
    )
    if spec.get("last_round"):
        kept.drop(spec)
    return result


def _caught(spec: dict[str, Any], config: ModelConfig, epochs: int) -> resume.TrainingState | None:
    """The training state the task resumes from (its own last checkpoint, which the coordinator found in
    storage), or None: without one, or with one that does not fit, it trains from the start."""
    if not spec.get("resume_from"):
        return None
    try:
        return resume.from_bytes(transfer.fetch(spec["resume_from"], resume.max_bytes(config, epochs)), config, epochs)
    except (WeightsError, transfer.TransferError) as exc:
        log.warning("its checkpoint cannot be used (%s); training from the start", exc)
        return None


def _warm_up(**_: Any) -> None:
    warm_up()


class Rounds:
    """What a peer keeps from one round of a federated session to the next: its shard parsed, its model built.

    A federated shard is the same object every round (the coordinator names it by `data_id`), so it is
    read, checked and parsed once; the model is rebuilt only if its shape changes, since each round
    loads the global weights into it anyway. The optimizer is made afresh each round, as FedAvg's
    local training starts from the global weights alone. Only the few most recent sessions are kept.
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self.kept: OrderedDict[str, tuple[Dataset, SimpleDNN | None]] = OrderedDict()

    @staticmethod
    def _key(spec: dict[str, Any]) -> str | None:
        if not spec.get("keep_data"):
            return None
        # The object and everything that decides how it is parsed: the same shard read another way is another entry.
        return json.dumps([spec.get(k) for k in ("data_id", "target", "features", "task", "classes", "normalization")],
                          sort_keys=True)

    def prepare(self, spec: dict[str, Any]) -> tuple[Dataset, SimpleDNN, int]:
        """The task's data, a model to train (holding any weights: the caller loads the round's), bytes fetched."""
        key = self._key(spec)
        if key is None or key not in self.kept:
            data, fetched = _fetch(spec)
            model = _model(spec, data)
        else:
            self.kept.move_to_end(key)
            (data, model), fetched = self.kept[key], 0
            wanted = _model_config(spec, data)
            if model is None or model.config != wanted or not spec.get("initial_weights"):
                model = _model(spec, data)
        if key is not None:
            self.kept[key] = (data, model)
            while len(self.kept) > self.keep:
                self.kept.popitem(last=False)
        return data, model, fetched

    def drop(self, spec: dict[str, Any]) -> None:
        """Forget a session's shard (its last round is done)."""
        key = self._key(spec)
        if key is not None:
            self.kept.pop(key, None)
            ShardCache(SHARDS).drop(spec["data_id"])


def _fetch(spec: dict[str, Any]) -> tuple[Dataset, int]:
    """The peer's data, read and validated, and how many bytes were downloaded for it."""
    if spec.get("keep_data"):
        # A federated shard is the same every round: fetch it once, drop it after the last round.
        cache = ShardCache(SHARDS)
        path, fetched = cache.fetch(spec["data"], spec["data_id"])
        data = _dataset(spec, path)
        if spec.get("last_round"):
            cache.drop(spec["data_id"])
        return data, fetched
    with tempfile.TemporaryDirectory(prefix="peertrain-") as tmp:
        path = Path(tmp) / "data.csv"
        fetched = transfer.download(spec["data"], path, MAX_DATA_BYTES)
        return _dataset(spec, path), fetched


def _model_config(spec: dict[str, Any], data: Dataset) -> ModelConfig:
    hp = spec["hyperparameters"]
    return ModelConfig(input_size=len(data.table.features), output_size=data.table.output_size,
                       hidden=tuple(hp["hidden"]), dropout=hp["dropout"], task=data.table.task)


def _model(spec: dict[str, Any], data: Dataset) -> SimpleDNN:
    return SimpleDNN(_model_config(spec, data), seed=spec["seed"])


class ShardCache:
    """Files fetched through grants, kept under one directory by the object's id (objects never change)."""

    def __init__(self, root: Path, keep: int = 8) -> None:
        self.root = root
        self.keep = keep

    def _path(self, object_id: str) -> Path:
        return self.root / f"{hashlib.sha256(object_id.encode()).hexdigest()[:32]}.csv"

    def fetch(self, grant: str, object_id: str) -> tuple[Path, int]:
        """The local copy of the object and how many bytes this call downloaded (0 when it was cached)."""
        path = self._path(object_id)
        if path.exists():
            path.touch()
            return path, 0
        self.root.mkdir(parents=True, exist_ok=True)
        # Its own partial file: peers of one machine (make run's share a process) may fetch one object at once.
        partial = path.with_suffix(f".{os.getpid()}.{uuid.uuid4().hex[:12]}.part")
        fetched = transfer.download(grant, partial, MAX_DATA_BYTES)
        os.replace(partial, path)
        # Sessions that ended early leave shards behind: keep only the most recently used few, and
        # whatever was used in the last minutes (other peers on this machine share the directory:
        # a shard another peer has just fetched must not go before that peer has read it).
        recent = time.time() - STALE_SECONDS
        for stale in sorted(self.root.glob("*.csv"), key=_mtime)[:-self.keep]:
            if _mtime(stale) < recent:
                stale.unlink(missing_ok=True)
        return path, fetched

    def drop(self, object_id: str) -> None:
        self._path(object_id).unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # another peer's pruning took it meanwhile
        return float("inf")


def _dataset(spec: dict[str, Any], path: Path) -> Dataset:
    table = read_table(path, target=spec["target"], features=spec["features"], task=spec["task"],
                       classes=spec.get("classes"))
    check_table_size(table.rows, len(table.features))
    if spec.get("normalization"):
        # Training rows, scaled as the coordinator says (a federated shard: like every other peer's); a share of
        # them kept aside for this peer's own validation curve, if the task asks.
        normalization = Normalization.from_dict(spec["normalization"])
        if spec.get("holdout"):
            train, val = split_indices(table.y, spec["holdout"], seed=spec["seed"], stratify=table.classes is not None)
            return Dataset.from_indices(table, train, val, normalization)
        return Dataset.from_indices(table, np.arange(table.rows), None, normalization)
    return prepare(table, VALIDATION_FRACTION, seed=spec["seed"], stratify=table.classes is not None)
