"""Federated sessions: the data is split once across the peers, the weights averaged every round.

The coordinator keeps a held-out validation part and writes one CSV shard per peer, so each peer
downloads only its own rows. Every round is a chord: each peer trains `local_epochs` from the
current global weights on its shard and returns its weights through storage; the body checks them
(shapes, finite values), aggregates (FedAvg weighted by samples, or the coordinate-wise median or
trimmed mean that resist a bad peer), evaluates the global model on the held-out rows, and starts
the next round or finishes the session with the global model as its result.
"""

from __future__ import annotations

import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import Round, TrainingSession
from models import event as events
from models import session as sessions
from tasks import lifecycle
from tasks.rounds import grant_seconds, grants, launch_round, record_results, session_prefix, storage
from tasks.storage import LocalStorage, StorageError
from trainer.csvfile import CsvFile
from trainer.loop import evaluate
from trainer.model import ModelConfig, SimpleDNN
from trainer.normalization import Normalization, fit_normalization
from trainer.split import VALIDATION_FRACTION, shard, split_indices
from trainer.table import Table, read_table
from trainer.weights import (
    Checkpoint,
    WeightsError,
    average,
    checkpoint_bytes,
    max_state_bytes,
    median,
    state_from_bytes,
    state_to_bytes,
    trimmed_mean,
)

log = logging.getLogger(__name__)

# A peer whose weights sit this many times farther from the aggregate than the typical peer's is
# reported as an outlier (the median and trimmed mean outvote it; FedAvg would not).
OUTLIER_FACTOR = 10.0
# Peers' weights read from storage at once while aggregating.
READERS = 8


def start(session: TrainingSession) -> None:
    """Prepare the session (`prepare`) and launch round 0."""
    launch_round(session, 0, specs(session, 0, prepare(session)))


def prepare(session: TrainingSession) -> str:
    """Split the dataset into held-out rows and one shard per peer, store them and the initial weights.

    Records the plan on the session; returns where the initial weights are."""
    prefix = session_prefix(session)
    store = storage()
    with tempfile.TemporaryDirectory(prefix="peertrain-") as tmp:
        path = Path(tmp) / "dataset.csv"
        store.download(session.dataset.url, path)
        table = read_table(path, target=session.target, features=session.features, task=session.task)
        classified = table.classes is not None
        train_rows, val_rows = split_indices(table.y, VALIDATION_FRACTION, seed=session.seed, stratify=classified)
        shards = shard(train_rows, table.y, len(session.peers), session.federated["partition"],
                       alpha=session.federated["alpha"], seed=session.seed)
        normalization = fit_normalization(table.x[train_rows], table.y[train_rows] if not classified else None)
        # Peers' objects live apart from the coordinator's (here and in storage): no peer's name can make
        # its shard, or its upload, the same object as the validation rows or the global weights.
        (Path(tmp) / "peers").mkdir()
        files = [Path(tmp) / "peers" / f"{run.name}.csv" for run in session.peers] + [Path(tmp) / "validation.csv"]
        CsvFile(path).split([*shards, val_rows], files)
        keys = [f"{prefix}/shards/peers/{run.name}.csv" for run in session.peers] + [f"{prefix}/shards/validation.csv"]
        stored = []
        for key, file in zip(keys, files, strict=True):
            with file.open("rb") as stream:
                stored.append(store.put(key, stream))
        urls = {run.name: url for run, url in zip(session.peers, stored, strict=False)}
        validation_url = stored[-1]

    hp = session.peers[0].hyperparameters
    config = ModelConfig(len(table.features), table.output_size, tuple(hp["hidden"]), hp.get("dropout", 0.0),
                         table.task)
    # Every peer starts round 0 from the same weights, as FedAvg requires.
    initial = store.put_bytes(f"{prefix}/rounds/initial.safetensors",
                                state_to_bytes(SimpleDNN(config, seed=session.seed).state_dict()))
    plan = {
        "shards": urls,
        "shard_rows": {run.name: len(rows) for run, rows in zip(session.peers, shards, strict=True)},
        "validation_url": validation_url,
        "validation_rows": len(val_rows),
        "normalization": normalization.to_dict(),
        "classes": table.classes,
        "model": config.to_dict(),
        "initial_url": initial,
    }
    TrainingSession.objects(id=session.id).update_one(set__plan=plan)
    session.reload()
    return initial


def weights_key(session: TrainingSession, round_: int, peer: str) -> str:
    return f"{session_prefix(session)}/rounds/{round_}/peers/{peer}.safetensors"


def specs(session: TrainingSession, round_: int, weights_url: str) -> list[dict[str, Any]]:
    """One `train` argument per peer still in the session, starting from the global weights."""
    initial = storage().grant_read(weights_url, grant_seconds())  # the same object for every peer: one grant
    last = round_ + 1 == session.federated["rounds"]
    config = ModelConfig.from_dict(session.plan["model"])
    return [spec(session, run, round_, initial, weights_key(session, round_, run.name), last, config)
            for run in session.peers if run.status != sessions.FAILED]


def spec(session: TrainingSession, run: Any, round_: int, initial_grant: str, key: str, last_round: bool,
         config: ModelConfig) -> dict[str, Any]:
    """A peer's `train` argument: `local_epochs` on its shard from the weights `initial_grant` opens,
    its weights to `key` (the only object it may write, capped at `config`'s size)."""
    plan = session.plan
    return {
        "peer": run.name,
        "session": str(session.id),
        "round": round_,
        "target": session.target,
        "features": list(session.features),
        "task": session.task,
        "classes": plan["classes"],
        "normalization": plan["normalization"],
        "seed": session.seed + round_,
        "hyperparameters": {**run.hyperparameters, "epochs": session.federated["local_epochs"]},
        "keep_data": True,
        "last_round": last_round,
        **grants(plan["shards"][run.name], key, config, initial_grant=initial_grant),
    }


def aggregate_round(session: TrainingSession, round_: int, results: list[dict[str, Any]]) -> None:
    """Check and combine the peers' weights, evaluate the global model, then go on or finish.

    Safe to run twice for one round (a redelivered `aggregate`): a round that is not the session's
    current one, or is recorded already, changes nothing but launching the next round if that is
    still to do."""
    plan, settings_ = session.plan, session.federated
    if session.launch.get("round") != round_:
        log.info("session %s: round %s is not the current round; nothing to aggregate", session.id, round_)
        return
    recorded = next((r for r in session.rounds if r.round == round_), None)
    if recorded is not None:
        _next(session, round_)
        return
    config = ModelConfig.from_dict(plan["model"])
    # The collector named each result's peer from its own records; the sample count and where the
    # weights are come from the coordinator's plan, never from what the peer says.
    record_results(session, results, sessions.RUNNING, samples={r["peer"]: plan["shard_rows"][r["peer"]]
                                                                for r in results})
    states, samples, rejected = {}, {}, {}
    # Reading S3 waits on the network: a few reads at once (a local file is read faster in this thread
    # than handed to another). Each is size-capped and checked.
    workers = 1 if isinstance(storage(), LocalStorage) else READERS
    with ThreadPoolExecutor(max_workers=workers) as readers:
        for result, read in zip(results, readers.map(lambda r: _weights(session, round_, r, config), results),
                                strict=True):
            peer = result["peer"]
            if isinstance(read, str):
                rejected[peer] = read
            else:
                states[peer], samples[peer] = read, plan["shard_rows"][peer]
    if len(states) < session.quorum:
        lifecycle.end(session.id, sessions.FAILED,
                      f"round {round_}: only {len(states)} peer(s) returned usable weights, "
                      f"{session.quorum} needed; rejected: {_listing(rejected)}")
        return

    names = sorted(states)
    merged = combine(settings_["aggregation"], [states[n] for n in names], [samples[n] for n in names])
    outliers = _outliers(merged, {n: states[n] for n in names})
    model = SimpleDNN(config)
    model.load_state_dict(merged)
    metrics = evaluate_global(model, session)
    global_url = storage().put_bytes(f"{session_prefix(session)}/rounds/{round_}/global.safetensors",
                                     state_to_bytes(merged, {"round": round_}))
    round_doc = Round(round=round_, metrics={**metrics, "samples": sum(samples.values())}, peers=names,
                      rejected=rejected, outliers=outliers)
    # Recorded once: the filter refuses a second copy of the same round.
    if not TrainingSession.objects(id=session.id, status=sessions.RUNNING, rounds__round__ne=round_).update_one(
            push__rounds=round_doc, set__plan__global_url=global_url):
        return  # it ended meanwhile, or another run of this round recorded it first
    events.record_round(session.id, round_doc)
    # What the update wrote, kept in step here rather than read again (a session document holds every peer).
    session.rounds.append(round_doc)
    session.plan["global_url"] = global_url
    _next(session, round_)


def _weights(session: TrainingSession, round_: int, result: dict[str, Any],
             config: ModelConfig) -> dict[str, torch.Tensor] | str:
    """A peer's weights of this round as the coordinator's plan places and caps them, or why they are unusable."""
    try:
        if result["stopped"]:
            raise WeightsError("it stopped before finishing the round")
        url = storage().url(weights_key(session, round_, result["peer"]))
        return state_from_bytes(storage().get_bytes(url, max_state_bytes(config)), config)
    except (WeightsError, ValueError, StorageError) as exc:
        return str(exc)


def _next(session: TrainingSession, round_: int) -> None:
    """After `round_` is recorded: launch the next round (once: launch_round is conditional) or finish."""
    if round_ + 1 < session.federated["rounds"]:
        launch_round(session, round_ + 1, specs(session, round_ + 1, session.plan["global_url"]))
        return
    config = ModelConfig.from_dict(session.plan["model"])
    model = SimpleDNN(config)
    model.load_state_dict(state_from_bytes(storage().get_bytes(session.plan["global_url"]), config))
    finish(session, model, config, session.rounds[-1].metrics)


def finish(session: TrainingSession, model: SimpleDNN, config: ModelConfig, metrics: dict[str, Any],
           extra: dict[str, Any] | None = None) -> None:
    """Store the global model as the session's result and end it COMPLETED (`extra`: more results)."""
    session.reload()
    plan, settings_ = session.plan, session.federated
    checkpoint = Checkpoint(
        config=config, features=list(session.features), target=session.target, classes=plan["classes"],
        normalization=Normalization.from_dict(plan["normalization"]),
        metadata={"session": str(session.id), "mode": "federated", "rounds": [r.metrics for r in session.rounds],
                  "aggregation": settings_["aggregation"], "global_weights_url": plan["global_url"],
                  "schedule": settings_.get("schedule", "sync")},
    )
    model_url = storage().put_bytes(f"{session_prefix(session)}/model.safetensors",
                                     checkpoint_bytes(model, checkpoint))
    metric = "val_accuracy" if session.task == "classification" else "val_r2"
    sessions.record_runs(session.id, sessions.positions(session),
                         {run.name: {"status": sessions.COMPLETED} for run in session.peers
                          if run.status == sessions.RUNNING})
    results = {"metric": metric, "best_value": metrics.get(metric), "final": metrics, "rounds": len(session.rounds),
               "aggregation": settings_["aggregation"],
               "bytes_fetched": sum(run.bytes_fetched or 0 for run in session.peers),
               "rejected": {f"round {r.round}": r.rejected for r in session.rounds if r.rejected}, **(extra or {})}
    lifecycle.end(session.id, sessions.COMPLETED, results=results, model_url=model_url)


def combine(method: str, states: list[dict[str, torch.Tensor]], samples: list[int]) -> dict[str, torch.Tensor]:
    if method == "median":
        return median(states)
    if method == "trimmed_mean":
        # Drop 20% from each end, and at least one peer once there are three: 20% of 4 peers is none,
        # which would leave a plain mean with no protection against a bad peer.
        fraction = 0.2 if len(states) < 3 else max(0.2, 1.000001 / len(states))
        return trimmed_mean(states, fraction)
    return average(states, samples)


def _outliers(merged: dict[str, torch.Tensor], states: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """Peers whose weights are far from the aggregate, with how many times the typical distance."""
    if len(states) < 3:
        return {}
    names = list(states)
    # Every peer's weights as one row: one distance computation for the whole round.
    flat = torch.stack([torch.cat([states[n][k].double().flatten() for k in merged]) for n in names])  # [peers, P]
    centre = torch.cat([merged[k].double().flatten() for k in merged])  # [P]
    distances = dict(zip(names, torch.linalg.vector_norm(flat - centre, dim=1).tolist(), strict=True))
    typical = float(np.median(list(distances.values()))) or 1e-12
    return {name: round(d / typical, 1) for name, d in distances.items() if d > OUTLIER_FACTOR * typical}


@lru_cache(maxsize=8)
def _validation(url: str, target: str, features: tuple[str, ...], task: str,
                classes: tuple[str, ...] | None) -> Table:
    # Read once per coordinator process and session, not once per round.
    with tempfile.TemporaryDirectory(prefix="peertrain-") as tmp:
        path = Path(tmp) / "validation.csv"
        storage().download(url, path)
        return read_table(path, target=target, features=list(features), task=task,
                          classes=list(classes) if classes else None)


def evaluate_global(model: SimpleDNN, session: TrainingSession) -> dict[str, Any]:
    plan = session.plan
    config = ModelConfig.from_dict(plan["model"])
    table = _validation(plan["validation_url"], session.target, tuple(session.features), config.task,
                        tuple(plan["classes"]) if plan["classes"] else None)
    normalization = Normalization.from_dict(plan["normalization"])
    y = normalization.apply_target(table.y) if config.task == "regression" else table.y
    scores = evaluate(model, normalization.apply(table.x), y)
    if config.task == "classification":
        return {"val_loss": scores["loss"], "val_accuracy": scores["accuracy"], "val_rows": scores["samples"]}
    return {"val_loss": scores["loss"], "val_r2": scores["r2"], "val_rows": scores["samples"]}


def _listing(rejected: dict[str, str]) -> str:
    return "; ".join(f"{peer}: {why}" for peer, why in rejected.items()) or "none"
