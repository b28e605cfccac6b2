"""Sweep sessions: every peer trains on the training rows with its own hyperparameters; the best model wins.

Which model is best is not the peers' say: the coordinator holds a fifth of the rows out (split with a
seed of its own that no peer learns, never in any grant), gives every peer only the training rows, loads
each peer's uploaded weights (through the gate: size-capped, shapes and values checked), scores them
itself on the held-out rows, and keeps the best as a checkpoint it builds from its own records (layer
sizes, features, classes, scaling) and writes where no peer can write. A peer's own curves are measured
on a part of its training rows (`holdout`).
"""

from __future__ import annotations

import logging
from typing import Any

from models import peer as peers
from models import session as sessions
from models.session import Plan
from tasks import gate
from tasks.gate import Outcome
from tasks.strategy import RoundStrategy
from trainer.model import ModelConfig, SimpleDNN
from trainer.normalization import Normalization, fit_normalization
from trainer.weights import Checkpoint, checkpoint_bytes

log = logging.getLogger(__name__)

# The share of its training rows a sweep peer keeps aside to draw its own validation curve.
HOLDOUT = 0.1


def weights_key(prefix: str, peer: str) -> str:
    """Where peer `peer` uploads its model (the only object its grant may write)."""
    return f"{prefix}/peers/{peer}/weights.safetensors"


def training_key(prefix: str, peer: str) -> str:
    """Where peer `peer` keeps its training state between epochs, for a resumed session to go on from."""
    return f"{prefix}/peers/{peer}/training.safetensors"


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
        classes = session.plan.classes if session.plan else session.dataset.classes
        return ModelConfig(len(session.features), len(classes) if classes else 1, tuple(hp["hidden"]),
                           hp.get("dropout", 0.0), session.task)

    def prepare(self) -> None:
        """Hold the validation rows out (the platform's seed: no peer learns which rows) and store the training
        rows, which every peer trains on; a plan recorded already (a start run again) is kept."""
        session = self.session
        if session.plan is not None and session.plan.validation_url:
            return
        key = f"{self.prefix}/shards/train.csv"
        table, urls = self.store_split(lambda table, train_rows: {key: train_rows})
        train_rows, val_rows = self.split_rows
        classified = table.classes is not None
        normalization = fit_normalization(table.x[train_rows], table.y[train_rows] if not classified else None)
        session.plan = Plan(shards={run.name: urls[key] for run in session.peers},
                            shard_rows={run.name: len(train_rows) for run in session.peers},
                            validation_url=urls[f"{self.prefix}/shards/validation.csv"],
                            validation_rows=len(val_rows), normalization=normalization.to_dict(),
                            classes=table.classes)
        sessions.record_plan(session.id, session.plan)

    def specs(self, round_: int, ids: dict[str, str]) -> dict[str, dict[str, Any]]:
        """The training rows (never the held-out ones), its own hyperparameters, its own upload grant."""
        session, plan = self.session, self.session.plan
        return {name: {
            "session": str(session.id),
            "round": round_,
            "target": session.target,
            "features": list(session.features),
            "task": session.task,
            "classes": plan.classes,
            "normalization": dict(plan.normalization),
            # Its own curves' validation: a part of its training rows (the held-out ones are not its to see).
            "holdout": HOLDOUT,
            "seed": session.seed,
            "attempt": session.resumes or 0,
            "hyperparameters": dict(session.peer(name).hyperparameters),
            **self.gate.grants(task_id, plan.shards[name], weights_key(self.prefix, name),
                               self.model_config(session.peer(name).hyperparameters)),
            # Its state every few epochs; resumed, it goes on from the last one it wrote.
            **self.gate.checkpoint_grants(task_id, training_key(self.prefix, name),
                                          self.model_config(session.peer(name).hyperparameters),
                                          session.peer(name).hyperparameters["epochs"],
                                          self.services.settings.checkpoint_epochs, resume=bool(session.resumes)),
        } for name, task_id in ids.items()}

    def checkpoint_bytes(self, model: SimpleDNN, peer: str, hyperparameters: dict[str, Any],
                         history: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> bytes:
        """`model` as a file a user downloads, built from the coordinator's own records (shape, features,
        classes, scaling), never from what the peer uploaded besides the weights."""
        session = self.session
        checkpoint = Checkpoint(
            config=model.config, features=list(session.features), target=session.target,
            classes=session.plan.classes, normalization=Normalization.from_dict(session.plan.normalization),
            metadata={"session": str(session.id), "peer": peer, "hyperparameters": dict(hyperparameters),
                      "history": list(history), **(extra or {})},
        )
        return checkpoint_bytes(model, checkpoint)

    def _score(self, peer: str) -> tuple[SimpleDNN, dict[str, Any]] | str:
        """The peer's uploaded model and the coordinator's own measure of it; or why it cannot be used."""
        config = self.model_config(dict(self.session.peer(peer).hyperparameters))
        state = self.gate.weights(weights_key(self.prefix, peer), config)
        if isinstance(state, str):
            return state
        model = SimpleDNN(config)
        model.load_state_dict(state)
        return model, self.evaluate_held_out(model)

    def aggregate(self, round_: int, kept: list[Outcome]) -> None:
        """Record every peer's result, score their models, keep the best; FAILED if no model holds up."""
        session = self.session
        self.record_results(kept, sessions.COMPLETED, samples={o.peer: gate.samples(session.plan, o.peer)
                                                                for o in kept})
        scored: dict[str, tuple[SimpleDNN, dict[str, Any], Outcome]] = {}
        for outcome in kept:
            found = "it stopped before finishing" if outcome.result["stopped"] else self._score(outcome.peer)
            if isinstance(found, str):
                log.warning("session %s: peer %s's model is left out: %s", session.id, outcome.peer, found)
                sessions.record_peer_result(session.id, outcome.peer, sessions.FAILED,
                                            error=f"its model was rejected: {found}")
            else:
                scored[outcome.peer] = (*found, outcome)
        refused = [o.peer for o in kept if o.peer not in scored and not o.result["stopped"]]
        sessions.count_updates(session.id, sessions.positions(session), list(scored), refused)
        for name in scored:
            peers.count(name, accepted=1)
        for name in refused:
            peers.count(name, "its model was rejected", rejected=1)
        if not scored:
            self.end(sessions.FAILED, "no peer returned a usable model")
            return
        metric = self.metric
        best = max(scored, key=lambda name: (scored[name][1][metric], -scored[name][1]["val_loss"]))
        model, verified, outcome = scored[best]
        model_url = self.storage.put_bytes(f"{self.prefix}/model.safetensors", self.checkpoint_bytes(
            model, best, session.peer(best).hyperparameters, outcome.result["history"]))
        summary = {
            "metric": metric,
            "best_peer": best,
            "best_value": verified[metric],
            # The coordinator's own scores on the held-out rows; what each peer reported is on its run.
            "peers": {name: {**{k: v for k, v in found.items() if k != "val_rows"}, "seconds": o.result["seconds"],
                             "samples_per_sec": o.result["final"].get("samples_per_sec")}
                      for name, (_, found, o) in scored.items()},
        }
        self.end(sessions.COMPLETED, results=summary, model_url=model_url)

    def finish(self) -> None:
        """A sweep ends with its one round (`aggregate`)."""
