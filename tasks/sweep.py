"""Sweep sessions: every peer trains on the whole dataset with its own hyperparameters; the best model wins.

Which model is best is not the peers' say: the coordinator splits the dataset as every peer did
(same seed), loads each peer's uploaded weights (through the gate: size-capped, shapes and values
checked), scores them itself on the validation rows, and keeps the best as a checkpoint it builds from
its own records (layer sizes, features, classes, scaling) and writes where no peer can write.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models import session as sessions
from tasks.gate import Outcome
from tasks.strategy import RoundStrategy, scores
from trainer.dataset import prepare
from trainer.loop import evaluate
from trainer.model import ModelConfig, SimpleDNN
from trainer.normalization import Normalization
from trainer.split import VALIDATION_FRACTION
from trainer.table import read_table
from trainer.weights import Checkpoint, checkpoint_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scoring:
    """What scoring a sweep's models needs of its dataset: the validation rows, scaled as the peers scaled."""

    val_x: np.ndarray
    val_y: np.ndarray
    normalization: Normalization
    train_rows: int


def weights_key(prefix: str, peer: str) -> str:
    """Where peer `peer` uploads its model (the only object its grant may write)."""
    return f"{prefix}/peers/{peer}/weights.safetensors"


class Sweep(RoundStrategy):
    """One round; each peer's own settings on the whole dataset; the coordinator scores the models."""

    @property
    def rounds(self) -> int:
        return 1

    def epochs(self, run: Any) -> int:
        return run.hyperparameters["epochs"]

    def model_config(self, hp: dict[str, Any]) -> ModelConfig:
        """The model a peer of this session builds from `hp`, known from the session alone."""
        session = self.session
        classes = session.dataset.classes
        return ModelConfig(len(session.features), len(classes) if classes else 1, tuple(hp["hidden"]),
                           hp.get("dropout", 0.0), session.task)

    def specs(self, round_: int, names: list[str]) -> dict[str, dict[str, Any]]:
        """The whole dataset, its own hyperparameters, its own upload grant."""
        session = self.session
        return {name: {
            "session": str(session.id),
            "round": round_,
            "target": session.target,
            "features": list(session.features),
            "task": session.task,
            "classes": session.dataset.classes,
            "seed": session.seed,
            "hyperparameters": dict(session.peer(name).hyperparameters),
            **self.gate.grants(session.dataset.url, weights_key(self.prefix, name),
                               self.model_config(session.peer(name).hyperparameters)),
        } for name in names}

    def launch_round(self, round_: int) -> None:
        super().launch_round(round_)
        self.scoring()  # while the peers train: read the validation rows the models will be scored on

    def scoring(self) -> Scoring:
        """The session's validation rows, split as every peer splits them; read once per coordinator process."""
        session = self.session
        classes = tuple(session.dataset.classes) if session.dataset.classes else None
        key = (session.dataset.url, session.target, tuple(session.features), session.task, classes, session.seed)
        return self.services.tables.get(key, lambda: self._read_scoring(classes))

    def _read_scoring(self, classes: tuple[str, ...] | None) -> Scoring:
        session = self.session
        with tempfile.TemporaryDirectory(prefix="peertrain-") as tmp:
            path = Path(tmp) / "dataset.csv"
            self.storage.download(session.dataset.url, path)
            table = read_table(path, target=session.target, features=list(session.features), task=session.task,
                               classes=list(classes) if classes else None)
        data = prepare(table, VALIDATION_FRACTION, seed=session.seed, stratify=table.classes is not None)
        return Scoring(data.val_x, data.val_y, data.normalization, len(data.train_y))

    def _score(self, peer: str, data: Scoring) -> tuple[SimpleDNN, dict[str, Any]] | str:
        """The peer's uploaded model and the coordinator's own measure of it; or why it cannot be used."""
        config = self.model_config(dict(self.session.peer(peer).hyperparameters))
        state = self.gate.weights(weights_key(self.prefix, peer), config)
        if isinstance(state, str):
            return state
        model = SimpleDNN(config)
        model.load_state_dict(state)
        return model, scores(evaluate(model, data.val_x, data.val_y), self.session.task)

    def aggregate(self, round_: int, kept: list[Outcome]) -> None:
        """Record every peer's result, score their models, keep the best; FAILED if no model holds up."""
        session, data = self.session, self.scoring()
        self.record_results(kept, sessions.COMPLETED, samples={o.peer: data.train_rows for o in kept})
        scored: dict[str, tuple[SimpleDNN, dict[str, Any], Outcome]] = {}
        for outcome in kept:
            found = "it stopped before finishing" if outcome.result["stopped"] else self._score(outcome.peer, data)
            if isinstance(found, str):
                log.warning("session %s: peer %s's model is left out: %s", session.id, outcome.peer, found)
                sessions.record_peer_result(session.id, outcome.peer, sessions.FAILED,
                                            error=f"its model was rejected: {found}")
            else:
                scored[outcome.peer] = (*found, outcome)
        if not scored:
            self.end(sessions.FAILED, "no peer returned a usable model")
            return
        metric = self.metric
        best = max(scored, key=lambda name: (scored[name][1][metric], -scored[name][1]["val_loss"]))
        model, verified, outcome = scored[best]
        checkpoint = Checkpoint(
            config=model.config, features=list(session.features), target=session.target,
            classes=session.dataset.classes, normalization=data.normalization,
            metadata={"session": str(session.id), "peer": best,
                      "hyperparameters": dict(session.peer(best).hyperparameters),
                      "history": outcome.result["history"]},
        )
        model_url = self.storage.put_bytes(f"{self.prefix}/model.safetensors", checkpoint_bytes(model, checkpoint))
        summary = {
            "metric": metric,
            "best_peer": best,
            "best_value": verified[metric],
            # The coordinator's own scores; what each peer reported is on its run.
            "peers": {name: {**{k: v for k, v in found.items() if k != "val_rows"}, "seconds": o.result["seconds"],
                             "samples_per_sec": o.result["final"].get("samples_per_sec")}
                      for name, (_, found, o) in scored.items()},
        }
        self.end(sessions.COMPLETED, results=summary, model_url=model_url)

    def finish(self) -> None:
        """A sweep ends with its one round (`aggregate`)."""
