"""How a session runs: one `Strategy` per mode, chosen once per session (`strategy_for`), as flwr's strategies.

Every strategy answers the same five calls, which the coordinator's Celery tasks (tasks/coordinator.py)
only dispatch to:
- `start()`: prepare the data and send the first tasks;
- `on_result(round_, outcomes)`: the platform decided about tasks (tasks/gate.py `Outcome`): a round's
  chord joined, or one asynchronous task came back;
- `on_lost(peer, reason)`: a peer will not report (its task failed, it fell silent);
- `on_deadline(assignments)`: tasks ran past their deadline;
- `finish()`: store the result and end the session COMPLETED.
Each call is safe to make twice, and after a crash half-way (a coordinator task is acknowledged only
after it ran, so it runs again when its worker died): every step is a conditional update.

`RoundStrategy` writes the round loop once, a chord per round (sweeps: one round; synchronous federated
sessions: R). The modes live in tasks/sweep.py (`Sweep`), tasks/search.py (`Search`: a sweep that searches a
space, trial by trial), tasks/federated.py (`SyncFederated`) and
tasks/asynchronous.py (`AsyncFederated`).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from celery import uuid

from models import TrainingSession
from models import assignment as assignments
from models import heartbeat as heartbeats
from models import peer as peers
from models import session as sessions
from models.session import Launch
from tasks import enrolment, gate, lifecycle, protocol, relay
from tasks.gate import Outcome
from tasks.services import Services
from trainer.csvfile import CsvFile
from trainer.loop import evaluate
from trainer.normalization import Normalization
from trainer.split import VALIDATION_FRACTION, split_indices
from trainer.table import Table, read_table

log = logging.getLogger(__name__)


def strategy_for(session: TrainingSession, services: Services) -> Strategy:
    """The strategy of `session`'s mode: the one place that asks which mode a session is."""
    if session.mode == sessions.SWEEP and session.search is not None:
        from tasks.search import Search

        return Search(session, services)
    if session.mode == sessions.SWEEP:
        from tasks.sweep import Sweep

        return Sweep(session, services)
    if session.federated.schedule == sessions.ASYNC:
        from tasks.asynchronous import AsyncFederated

        return AsyncFederated(session, services)
    from tasks.federated import SyncFederated

    return SyncFederated(session, services)


def metric_of(task: str) -> str:
    """The held-out metric a session's models are judged by (higher is better)."""
    return "val_accuracy" if task == "classification" else "val_r2"


def split_seed(session: TrainingSession) -> int:
    """The seed that holds the validation rows out: the platform's own (sessions before it: the user's)."""
    return session.split_seed if session.split_seed is not None else session.seed


def scores(evaluated: dict[str, Any], task: str) -> dict[str, Any]:
    """trainer.loop.evaluate's measures as a session reports them."""
    return {"val_loss": evaluated["loss"],
            metric_of(task): evaluated["accuracy" if task == "classification" else "r2"],
            "val_rows": evaluated["samples"]}


class Strategy:
    """One session's mode: what to send, what to make of what comes back, how it ends."""

    def __init__(self, session: TrainingSession, services: Services) -> None:
        self.session = session
        self.services = services
        self.app = services.app
        self.storage = services.storage
        self.clock = services.clock
        self.gate = services.gate

    # --- the interface ------------------------------------------------------------------------------

    def start(self) -> None:
        raise NotImplementedError

    def on_result(self, round_: int, outcomes: list[Outcome]) -> None:
        raise NotImplementedError

    def on_lost(self, peer: str, reason: str) -> None:
        raise NotImplementedError

    def on_deadline(self, overdue: list[dict[str, Any]]) -> None:
        """Leave out the peers of tasks past their deadline (each once: its task is decided then)."""
        for assignment in overdue:
            if self.session.finished:
                return
            peers.count(assignment["peer"], timed_out=1)
            seconds = (assignment["deadline"] - assignment["sent_at"]).total_seconds()
            self.on_lost(assignment["peer"], f"did not finish {self.unit} {assignment['round']} within its "
                                             f"{seconds:g} s")

    def finish(self) -> None:
        raise NotImplementedError

    def on_joined(self, names: list[str]) -> None:
        """Peers that came online were claimed for this (elastic) session; a mode that cannot grow lets them go."""
        peers.release(self.session.id, names)

    def admit(self, names: list[str], plan: dict[str, Any] | None = None) -> list[str]:
        """Add runs for peers `names` claimed for this running session (with `plan` entries for them), once;
        those of them it has now. If it ended or grew past `max_peers` meanwhile, the rest are let go."""
        session = self.session
        for _ in range(5):  # another addition may come first: read again and retry
            session.reload()
            have = {run.name for run in session.peers}
            new = [name for name in names if name not in have]
            room = (session.max_peers or len(have)) - len(have)
            if session.finished or not new or room < len(new):
                break
            template = session.peers[0]
            runs = [sessions.PeerRun(name=name, hyperparameters=dict(template.hyperparameters),
                                     epochs=template.epochs) for name in new]
            if sessions.add_runs(session.id, runs, plan):
                session.reload()
                break
        admitted = [name for name in names if name in {run.name for run in session.peers}]
        if session.finished:
            admitted = []
        refused = [name for name in names if name not in admitted]
        if refused:
            peers.release(session.id, refused)
        if admitted:
            log.info("session %s: peer(s) %s joined", session.id, ", ".join(admitted))
        return admitted

    def stalled(self) -> bool:
        """True while work waits on another coordinator (which may have died): ask again `retry_after` s later."""
        return False

    retry_after = 1.0

    # --- shared ----------------------------------------------------------------------------------------

    unit = "round"  # what a task is part of, in messages

    @property
    def metric(self) -> str:
        return metric_of(self.session.task)

    @property
    def prefix(self) -> str:
        """Where the session's objects live in storage."""
        return f"users/{self.session.owner_id}/sessions/{self.session.id}"

    # --- the held-out rows: split with a seed no peer learns, written where no grant reaches ----------------

    def store_split(self, parts: Callable[[Table, np.ndarray], dict[str, np.ndarray]]) -> tuple[Table, dict[str, str]]:
        """Read the dataset, hold out the validation rows, and store the parts `parts(table, train_rows)` names
        (key -> rows) and `shards/validation.csv` under the session's prefix; (the table, key -> URL)."""
        session = self.session
        with tempfile.TemporaryDirectory(prefix="peertrain-") as tmp:
            path = Path(tmp) / "dataset.csv"
            self.storage.download(session.dataset.url, path)
            table = read_table(path, target=session.target, features=list(session.features), task=session.task)
            train_rows, val_rows = split_indices(table.y, VALIDATION_FRACTION, seed=split_seed(session),
                                                 stratify=table.classes is not None)
            keys = {**parts(table, train_rows), f"{self.prefix}/shards/validation.csv": val_rows}
            # Peers' objects live apart from the coordinator's (here and in storage): no peer's name can make
            # its shard, or its upload, the same object as the validation rows or the global weights.
            files = [Path(tmp) / f"part{i}.csv" for i in range(len(keys))]
            CsvFile(path).split(list(keys.values()), files)
            urls = {}
            for key, file in zip(keys, files, strict=True):
                with file.open("rb") as stream:
                    urls[key] = self.storage.put(key, stream)
        self.split_rows = (train_rows, val_rows)
        return table, urls

    def held_out(self) -> Table:
        """The held-out rows (the plan's), read once per coordinator process and session."""
        plan, session = self.session.plan, self.session
        classes = tuple(plan.classes) if plan.classes else None

        def read() -> Table:
            with tempfile.TemporaryDirectory(prefix="peertrain-") as tmp:
                path = Path(tmp) / "validation.csv"
                self.storage.download(plan.validation_url, path)
                return read_table(path, target=session.target, features=list(session.features), task=session.task,
                                  classes=list(classes) if classes else None)

        return self.services.tables.get((plan.validation_url, session.target, tuple(session.features), classes),
                                        read)

    def held_out_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The held-out rows as a model sees them (scaled as the training rows were)."""
        table, normalization = self.held_out(), Normalization.from_dict(self.session.plan.normalization)
        y = normalization.apply_target(table.y) if self.session.task == "regression" else table.y
        return normalization.apply(table.x), y

    def evaluate_held_out(self, model: Any) -> dict[str, Any]:
        """A model's measures on the held-out rows."""
        return scores(evaluate(model, *self.held_out_arrays()), self.session.task)

    def end(self, status: str, reason: str | None = None, **fields: Any) -> bool:
        return lifecycle.end(self.app, self.session.id, status, reason, at=self.clock.now(), **fields)

    def deadline_seconds(self) -> int:
        """How long the whole session may run (past that the monitor fails it)."""
        raise NotImplementedError

    def task_deadline(self, sent_at: Any) -> Any:
        """When a task sent at `sent_at` is overdue (its peer is then left out): after the user's `round_timeout`,
        or else the training time limit, until the monitor measures its fellows (models.assignment.tighten)."""
        timeout = self.session.round_timeout or self.services.settings.train_time_limit
        return sent_at + timedelta(seconds=timeout)

    def give_up_on(self, peer: str, reason: str) -> bool:
        """Leave `peer` out (FAILED with `reason`), or end the session if it cannot go on; True if it ended."""
        session = self.session
        sessions.record_peer_result(session.id, peer, sessions.FAILED, error=reason)
        lifecycle.request_stop(self.app, str(session.id), [peer], reason, session.resumes or 0)
        if session.can_lose(peer):
            log.warning("session %s goes on without peer %s: %s", session.id, peer, reason)
            session.peer(peer).status = sessions.FAILED
            return False
        return self.end(sessions.FAILED, f"peer {peer} {reason}")

    def leave_out(self, assignment: dict[str, Any], reason: str) -> Outcome:
        """Decide `assignment` as left out, unless it was decided already; the outcome it has now."""
        decided = Outcome.of(assignment)
        if decided is None:
            verdict = gate.left_out(assignment, reason)
            if assignments.claim(assignment["_id"], verdict.stored(), self.clock.now()):
                relay.hand_on(self.app, self.services.queue, assignment, verdict, self.clock.now(), report_lost=False)
                return verdict
            assignment = assignments.get(assignment["_id"])
            decided = Outcome.of(assignment)
        if not assignment.get("settled"):
            # Decided by another run, passing it on now, or by one that died before it could.
            relay.hand_on(self.app, self.services.queue, assignment, decided, self.clock.now(), report_lost=False)
        return decided

    def record_assignments(self, tasks: list[tuple[str, str, int, int, dict[str, Any] | None]], at: Any,
                           of: int | None = None) -> None:
        """Record tasks about to be sent: (task id, peer, round, epochs, chord place) each (`of`: the epochs of
        the whole training a task is a stretch of, which its heartbeats show)."""
        position = sessions.positions(self.session)
        deadline = self.task_deadline(at)
        assignments.record({"_id": task_id, "session_id": self.session.id, "peer": peer, "round": round_,
                            "epochs": epochs, "position": position[peer], "chord": chord, "sent_at": at,
                            "deadline": deadline, "fixed": bool(self.session.round_timeout),
                            **({"of": of} if of else {})}
                           for task_id, peer, round_, epochs, chord in tasks)

    def record_results(self, outcomes: list[Outcome], status: str, samples: dict[str, int]) -> None:
        """Store trained outcomes: final metrics, sample counts, every epoch's heartbeat.

        A round's results in one insert of heartbeats and one update of the session, however many peers."""
        if not outcomes:
            return
        session = self.session
        # The epochs first: the event stream shows a peer's heartbeats before its result.
        heartbeats.insert_many({"session_id": session.id, "peer": o.peer, "round": o.round, **epoch}
                               for o in outcomes for epoch in o.result["history"])
        changes = {}
        for o in outcomes:
            final = o.result["final"]
            changes[o.peer] = {"status": status, "final": final, "samples": samples[o.peer], "round": o.round,
                               **{k: final.get(k) for k in protocol.PROGRESS if k in final}}
        # A federated peer fetches its shard once and keeps it for later rounds: bytes add up.
        sessions.record_runs(session.id, sessions.positions(session), changes,
                             before={run.name: run.status for run in session.peers},
                             added={o.peer: {"bytes_fetched": o.result["bytes_fetched"]} for o in outcomes},
                             active_only=True)  # a result in flight when the session ended changes nothing of it


class RoundStrategy(Strategy):
    """Rounds: every peer in play trains from the same start, a chord joins their outcomes into `on_result`."""

    @property
    def rounds(self) -> int:
        raise NotImplementedError

    def prepare(self) -> None:
        """Whatever the first round needs (safe to run twice)."""

    def before_round(self, names: list[str]) -> None:
        """Whatever a round of peers `names` needs before it is recorded (safe to run twice)."""

    def epochs(self, run: Any) -> int:
        """Epochs a task of `run`'s trains."""
        raise NotImplementedError

    def specs(self, round_: int, ids: dict[str, str]) -> dict[str, dict[str, Any]]:
        """Each peer's `train` argument for round `round_` (`ids`: peer -> its task's id)."""
        raise NotImplementedError

    def aggregate(self, round_: int, kept: list[Outcome]) -> None:
        """Make the round's result from the outcomes of the peers that trained (at least a quorum)."""
        raise NotImplementedError

    def deadline_seconds(self) -> int:
        # Each round may use a training task's whole time limit; past that the session cannot succeed.
        return self.rounds * (self.services.settings.train_time_limit + 60)

    def start(self) -> None:
        # A resumed session goes on from the first round it has no record of: those done are kept.
        first = len(self.session.rounds)
        if self.session.status == sessions.PENDING or self._unsent(first):
            self.prepare()
            if first >= self.rounds:
                self.finish()  # interrupted between its last round and its end
                return
            self.launch_round(first)

    def _unsent(self, round_: int) -> bool:
        launch = self.session.launch
        return (self.session.status == sessions.RUNNING and launch is not None and launch.round == round_
                and not launch.sent)

    def launch_round(self, round_: int) -> None:
        """Record round `round_` and send its chord, once: a second run sends only what the first recorded and
        did not send (it died in between); a round recorded and sent is not sent again."""
        session = self.session
        if session.launch is None or session.launch.round != round_:
            names = [run.name for run in session.in_play()]
            self.before_round(names)
            now = self.clock.now()
            body = protocol.TaskId(str(session.id), round_, f"aggregate-{uuid()}")
            launch = Launch(round=round_, group=uuid(), body=str(body), peers=names, started_at=now, sent=False)
            ids = {name: str(protocol.TaskId.new(session.id, round_)) for name in names}
            position = sessions.positions(session)
            if session.status == sessions.PENDING:  # its first round, or the first of a resumed session
                recorded = sessions.start_running(session.id, ids, launch, self.deadline_seconds(), position, now)
            else:
                recorded = sessions.next_round(session.id, ids, launch, position)
            session.reload()
            if not recorded and not self._unsent(round_):
                log.info("session %s: round %d was launched already, or the session ended", session.id, round_)
                return
        elif not self._unsent(round_):
            return
        self._send(round_)

    def _send(self, round_: int) -> None:
        session, launch = self.session, self.session.launch
        ids = {name: session.peer(name).task_id for name in launch.peers}
        size = len(launch.peers)
        self.record_assignments(
            [(ids[name], name, round_, self.epochs(session.peer(name)),
              {"group": launch.group, "index": i, "size": size, "body": launch.body})
             for i, name in enumerate(launch.peers)], launch.started_at)
        specs = self.specs(round_, ids)
        if round_ == len(session.rounds) and (round_ == 0 or session.resumes):  # the first round of this run
            enrolment.declare_queues(self.app, list(launch.peers))
        header = [relay.train(self.app, name, ids[name], specs[name], self.gate.grant_seconds,
                              f"session {session.id}, round {round_}, peer {name}") for name in launch.peers]
        relay.send(self.app, header, launch.group,
                   relay.body(self.app, self.services.queue, str(session.id), round_, launch.body, size))
        sessions.launched(session.id, round_)

    def on_result(self, round_: int, outcomes: list[Outcome]) -> None:
        """The round's chord joined: every peer reported or was left out."""
        session = self.session
        if session.finished or session.launch is None:
            return
        if session.launch.round == round_ + 1:
            self.next_round(round_)  # a redelivery: the next round was recorded, and may not have been sent
            return
        if session.launch.round != round_:
            return
        kept = []
        for outcome in outcomes:
            if outcome.left_out:
                if session.peer(outcome.peer).status != sessions.FAILED and self.give_up_on(outcome.peer,
                                                                                           outcome.reason):
                    return
            else:
                kept.append(outcome)
        if len(kept) < session.quorum:
            self.end(sessions.FAILED, f"round {round_}: {len(kept)} peer(s) finished, {session.quorum} needed")
            return
        self.aggregate(round_, kept)

    def on_lost(self, peer: str, reason: str) -> None:
        """A peer will not report this round: its part of the chord is decided left out, so the round closes
        when the others have reported (a late result of it is then dropped); it is given up on."""
        session = self.session
        if session.finished or session.launch is None or peer not in session.launch.peers:
            return
        if session.peer(peer).status == sessions.FAILED:
            return
        assignment = assignments.of_round(session.id, session.launch.round, peer)
        if assignment is None:
            return
        if self.leave_out(assignment, reason).left_out:
            self.give_up_on(peer, reason)

    def next_round(self, round_: int) -> None:
        """After `round_` is recorded: launch the next round (once) or finish."""
        if round_ + 1 < self.rounds:
            self.launch_round(round_ + 1)
        else:
            self.finish()
