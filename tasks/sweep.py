"""Sweep sessions: every peer trains on the whole dataset with its own hyperparameters; the best model wins.

Which model is best is not the peers' say: the coordinator splits the dataset as every peer did
(same seed), loads each peer's uploaded weights (size-capped, shapes and values checked), scores
them itself on the validation rows, and keeps the best as a checkpoint it builds from its own
records (layer sizes, features, classes, scaling) and writes where no peer can write.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from models import TrainingSession
from models import session as sessions
from tasks import lifecycle
from tasks.rounds import grants, record_results, session_prefix, storage
from trainer.dataset import prepare
from trainer.loop import evaluate
from trainer.model import ModelConfig, SimpleDNN
from trainer.normalization import Normalization
from trainer.split import VALIDATION_FRACTION
from trainer.table import read_table
from trainer.weights import Checkpoint, WeightsError, checkpoint_bytes, max_state_bytes, state_from_bytes

log = logging.getLogger(__name__)


def model_config(session: TrainingSession, hp: dict[str, Any]) -> ModelConfig:
    """The model a peer of this session builds from `hp`, known from the session alone."""
    classes = session.dataset.classes
    return ModelConfig(len(session.features), len(classes) if classes else 1, tuple(hp["hidden"]),
                       hp.get("dropout", 0.0), session.task)


def weights_key(session: TrainingSession, peer: str) -> str:
    return f"{session_prefix(session)}/peers/{peer}/weights.safetensors"


def specs(session: TrainingSession) -> list[dict[str, Any]]:
    """One `train` argument per peer: the whole dataset, its own hyperparameters, its own upload grant."""
    return [
        {
            "peer": run.name,
            "session": str(session.id),
            "round": 0,
            "target": session.target,
            "features": list(session.features),
            "task": session.task,
            "classes": session.dataset.classes,
            "seed": session.seed,
            "hyperparameters": dict(run.hyperparameters),
            **grants(session.dataset.url, weights_key(session, run.name), model_config(session, run.hyperparameters)),
        }
        for run in session.peers
    ]


@dataclass(frozen=True)
class Scoring:
    """What scoring a sweep's models needs of its dataset: the validation rows, scaled as the peers scaled."""

    val_x: np.ndarray
    val_y: np.ndarray
    normalization: Normalization
    train_rows: int


def prepared(session: TrainingSession) -> Scoring:
    """The session's validation rows, split as every peer splits them; read once per coordinator process."""
    classes = tuple(session.dataset.classes) if session.dataset.classes else None
    return _prepared(session.dataset.url, session.target, tuple(session.features), session.task, classes,
                     session.seed)


@lru_cache(maxsize=4)
def _prepared(url: str, target: str, features: tuple[str, ...], task: str, classes: tuple[str, ...] | None,
              seed: int) -> Scoring:
    with tempfile.TemporaryDirectory(prefix="peertrain-") as tmp:
        path = Path(tmp) / "dataset.csv"
        storage().download(url, path)
        table = read_table(path, target=target, features=list(features), task=task,
                           classes=list(classes) if classes else None)
    data = prepare(table, VALIDATION_FRACTION, seed=seed, stratify=table.classes is not None)
    return Scoring(data.val_x, data.val_y, data.normalization, len(data.train_y))


def _score(session: TrainingSession, hp: dict[str, Any], data: Scoring, peer: str) -> tuple[SimpleDNN, dict]:
    """The peer's uploaded model and the coordinator's own measure of it on the validation rows."""
    config = model_config(session, hp)
    state = state_from_bytes(storage().get_bytes(storage().url(weights_key(session, peer)), max_state_bytes(config)),
                             config)
    model = SimpleDNN(config)
    model.load_state_dict(state)
    scores = evaluate(model, data.val_x, data.val_y)
    key = "val_accuracy" if session.task == "classification" else "val_r2"
    return model, {"val_loss": scores["loss"], key: scores["accuracy" if key == "val_accuracy" else "r2"]}


def finish(session: TrainingSession, results: list[dict[str, Any]]) -> None:
    """Record every peer's result, score their models, keep the best; FAILED if no model holds up."""
    data = prepared(session)
    metric = "val_accuracy" if session.task == "classification" else "val_r2"
    scored: dict[str, tuple[SimpleDNN, dict[str, Any], dict[str, Any]]] = {}
    record_results(session, results, sessions.COMPLETED, samples={r["peer"]: data.train_rows for r in results})
    for result in results:
        run = session.peer(result["peer"])
        try:
            if result["stopped"]:
                raise WeightsError("it stopped before finishing")
            model, verified = _score(session, dict(run.hyperparameters), data, run.name)
            scored[run.name] = (model, verified, result)
        except (WeightsError, ValueError, OSError) as exc:
            log.warning("session %s: peer %s's model is left out: %s", session.id, run.name, exc)
            sessions.record_peer_result(session.id, run.name, sessions.FAILED, error=f"its model was rejected: {exc}")
    if not scored:
        lifecycle.end(session.id, sessions.FAILED, "no peer returned a usable model")
        return
    best = max(scored, key=lambda name: (scored[name][1][metric], -scored[name][1]["val_loss"]))
    model, verified, result = scored[best]
    checkpoint = Checkpoint(
        config=model.config, features=list(session.features), target=session.target,
        classes=session.dataset.classes, normalization=data.normalization,
        metadata={"session": str(session.id), "peer": best, "hyperparameters": dict(session.peer(best).hyperparameters),
                  "history": result["history"]},
    )
    model_url = storage().put_bytes(f"{session_prefix(session)}/model.safetensors", checkpoint_bytes(model, checkpoint))
    summary = {
        "metric": metric,
        "best_peer": best,
        "best_value": verified[metric],
        # The coordinator's own scores; what each peer reported is on its run.
        "peers": {name: {**scores, "seconds": r["seconds"], "samples_per_sec": r["final"].get("samples_per_sec")}
                  for name, (_, scores, r) in scored.items()},
    }
    lifecycle.end(session.id, sessions.COMPLETED, results=summary, model_url=model_url)
