"""The coordinator on its own, as a unit: its real tasks and strategies, given collaborators no service is behind.

`kit` builds the coordinator's app (tasks/coordinator.py `create_app`) on Celery's in-memory broker and
result backend, a local storage directory, mongomock and a clock the test moves. Its helpers play the
other parts: they take the messages the coordinator sent off their queues, act as a peer would (weights
written where the task's grant says, a result reported through the coordinator's own collector) and
run the coordinator's tasks as its worker would, one message at a time. A "crash" is an exception no
code path catches (BaseException), raised between two steps, as a process dying there would stop it.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import torch
from bson import ObjectId

from harness.datasets import blobs_csv
from models import Dataset, PeerRun, TrainingSession
from models import peer as peers
from models import session as sessions
from settings import Settings
from tasks import protocol, transfer
from tasks.collector import Collector
from tasks.services import FrozenClock
from tasks.storage import LocalGrants, LocalStorage
from trainer.model import ModelConfig
from trainer.weights import max_state_bytes, state_from_bytes, state_to_bytes


class Crash(BaseException):
    """A process dying here: nothing catches it, nothing after it runs."""


@dataclass
class Kit:
    app: Any
    storage: LocalStorage
    clock: FrozenClock
    settings: Settings
    tmp: Path
    run: str
    taken: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def services(self) -> Any:
        return self.app.services

    def peer(self, i: int) -> str:
        return f"p{i}{self.run}"

    def session(self, peers_: int = 2, mode: str = sessions.SWEEP, min_peers: int | None = None,
                search: dict[str, Any] | None = None, **federated: Any) -> TrainingSession:
        """A PENDING session on `peers_` claimed peers, its dataset in storage, as the API leaves it."""
        session_id = ObjectId()
        csv = blobs_csv(self.tmp / f"{session_id}.csv", rows=120, features=4, classes=2)
        with csv.open("rb") as stream:
            url = self.storage.put(f"users/u/sessions/{session_id}/dataset.csv", stream)
        names = [self.peer(i) for i in range(peers_)]
        for name in names:
            if peers.Peer.objects(name=name).first() is None:
                peers.register(name)
            peers.Peer.objects(name=name).update_one(set__status=peers.TRAINING, set__session_id=session_id)
        hp = {"epochs": 2, "hidden": [8], "batch_size": 16, "learning_rate": 0.05, "optimizer": "adam",
              "dropout": 0.0}
        settings_ = sessions.FederatedSettings(**federated) if mode == sessions.FEDERATED else None
        return TrainingSession(
            id=session_id, owner_id=ObjectId(), mode=mode, target="label", features=["f0", "f1", "f2", "f3"],
            dataset=Dataset(filename="b.csv", url=url, bytes=1, sha256="0" * 64, rows=120, columns=5,
                            classes=["0", "1"]),
            peers=[PeerRun(name=name, hyperparameters=hp) for name in names], federated=settings_,
            min_peers=min_peers, round_timeout=60,
            search=sessions.SearchState(**search) if search is not None else None,
        ).save()

    def reload(self, session: TrainingSession) -> TrainingSession:
        return TrainingSession.objects.get(id=session.id)

    # --- the broker ------------------------------------------------------------------------------------

    def take(self, queue: str) -> list[dict[str, Any]]:
        """The task messages waiting on `queue`, taken off it: {task, id, args} each."""
        found = []
        with self.app.connection_for_read() as connection, connection.SimpleQueue(queue) as waiting:
            while True:
                try:
                    message = waiting.get_nowait()
                except waiting.Empty:
                    break
                args, _, _ = message.payload
                found.append({"task": message.headers["task"], "id": message.headers["id"], "args": args})
                message.ack()
        self.taken.setdefault(queue, []).extend(found)
        return found

    def trains(self, session: TrainingSession) -> dict[str, list[dict[str, Any]]]:
        """The `train` tasks waiting on each of the session's peers' queues."""
        return {run.name: self.take(protocol.task_queue(run.name)) for run in session.peers}

    def coordinate(self, crash_in: Callable[[], Any] | None = None, limit: int = 50) -> list[str]:
        """Run what waits on the coordinator's queue as its worker would, until nothing does; the tasks run."""
        ran = []
        for _ in range(limit):
            waiting = self.take(self.settings.coordinator_queue)
            if not waiting:
                return ran
            for message in waiting:
                self.app.tasks[message["task"]](*message["args"])
                ran.append(message["task"])
        raise AssertionError(f"the coordinator kept finding work after {limit} rounds: {ran[-10:]}")

    # --- peers -------------------------------------------------------------------------------------------

    def _key(self, grant: str) -> str:
        return unquote(urlsplit(grant).path.split("/objects/", 1)[1])

    def granted(self, grant: str, max_bytes: int) -> bytes:
        """What a read grant opens: the object in the task itself (a small model's weights), or in storage."""
        if grant.startswith("data:"):
            return transfer.fetch(grant, max_bytes)
        return self.storage.get_bytes(self.storage.url(self._key(grant)), max_bytes)

    def answer(self, message: dict[str, Any], peer: str, spoil: str | None = None, fail: str | None = None,
               via: Collector | None = None) -> bool:
        """Play peer `peer` answering task `message`: its weights where the grant says, its result reported."""
        spec = protocol.train_spec(message["args"][0])
        if fail:
            payload = protocol.result_message(message["id"], "FAILURE", {"exc_type": "RuntimeError",
                                                                          "exc_message": [fail]})
            return (via or Collector(self.services)).collect(protocol.broker_user(peer), 100, payload)
        hp = spec["hyperparameters"]
        config = ModelConfig(len(spec["features"]), len(spec["classes"]), tuple(hp["hidden"]), hp["dropout"],
                             spec["task"])
        if spec["initial_weights"]:
            start = state_from_bytes(self.granted(spec["initial_weights"], max_state_bytes(config)), config)
        else:
            from trainer.model import SimpleDNN

            start = SimpleDNN(config, seed=spec["seed"]).state_dict()
        generator = torch.Generator().manual_seed(hash(peer) & 0xFFFF)
        state = {k: v + 1e-3 * torch.randn(v.shape, generator=generator) for k, v in start.items()}
        if spoil == "nan":
            state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
        self.storage.put_bytes(self._key(spec["weights"]), state_to_bytes(state))
        epochs = spec["until"] or hp["epochs"]  # a search's stretch pauses after `until`
        history = [{"epoch": e, "loss": 1.0 / e, "accuracy": 0.5, "val_loss": 0.7, "val_accuracy": 0.5,
                    "samples_per_sec": 1000.0, "seconds": 0.01, "finished_at": 1.7e9} for e in range(1, epochs + 1)]
        result = {"final": history[-1], "history": history, "bytes_fetched": 10, "seconds": 0.02, "stopped": False}
        payload = protocol.result_message(message["id"], "SUCCESS", result)
        return (via or Collector(self.services)).collect(protocol.broker_user(peer), 1000, payload)

    def run_to_end(self, session: TrainingSession, rounds: int = 80, **options: Any) -> TrainingSession:
        """Answer every task and run the coordinator until nothing more is sent; the session as it ended."""
        for _ in range(rounds):
            self.coordinate()
            if not self.answer_all(session, **options):
                break
        self.coordinate()
        return self.reload(session)

    def answer_all(self, session: TrainingSession, **options: Any) -> int:
        """Every waiting `train` task of the session answered by its peer; returns how many."""
        count = 0
        for name, messages in self.trains(session).items():
            for message in messages:
                self.answer(message, name, **options)
                count += 1
        return count


@pytest.fixture
def kit(db: str, tmp_path: Path) -> Iterator[Kit]:
    from tasks.coordinator import create_app

    run = uuid.uuid4().hex[:6]
    settings = dataclasses.replace(
        Settings.from_env(), broker_url="memory://localhost/", result_backend="cache+memory://", mongodb_uri=db,
        storage_url=str(tmp_path / "storage"), coordinator_queue=f"coordinator-{run}",
        results_queue=f"results-{run}", event_exchange=f"events-{run}", train_time_limit=120)
    storage = LocalStorage(tmp_path / "storage", LocalGrants("http://127.0.0.1:1", b"k" * 32))
    clock = FrozenClock()
    yield Kit(create_app(settings, storage, clock), storage, clock, settings, tmp_path, run)
