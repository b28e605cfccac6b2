"""The trust gate: everything a peer sends, uploads or is given passes here, judged on the platform's own records.

A peer is a stranger's machine; what it says is believed only as far as the platform can check it:
- **who**: the broker's verified `user_id` names the sender (`sender`), never a name inside a message;
- **what was asked**: a result or a heartbeat counts only for a task the coordinator recorded for that
  very peer (models/assignment.py), while that task is open (a heartbeat: or just decided);
- **what it says**: sizes capped before decoding, fields reduced to the protocol's schemas
  (tasks/protocol.py), numbers finite, epochs within the task's;
- **what it uploaded**: weights read from where the coordinator's plan puts them, size-capped, shapes
  and values checked (`weights`);
- **how much it counts**: sample counts from the coordinator's plan (`samples`), never the peer's;
- **what it may touch**: grants to exactly the objects of its task (`grants`);
- **how much it may send**: a budget per peer (`Budget`), spent before its message is even decoded.
The strategies (tasks/strategy.py) and the monitor decide nothing about a peer's word themselves:
they ask this module. Its verdicts are `Outcome`s, which only it makes, so a peer cannot craft one.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from tasks import protocol, transfer
from tasks.services import Clock
from tasks.storage import Storage, StorageError

log = logging.getLogger(__name__)

TRAINED, LEFT_OUT = "trained", "left_out"
# A heartbeat may trail its task's result by a little (the result can be read first): it still counts.
HEARTBEAT_GRACE = timedelta(seconds=30)
# Longest a task's grants stay valid beyond the training time limit (a task may wait in its queue).
GRANT_SLACK_SECONDS = 600


class Budget:
    """What one peer may send per second (`rate`, in bursts of up to `burst`), checked on a message's verified
    sender before anything reads the message: one peer's flood costs that peer's messages, nobody else's.
    The platform's own processes (a sender that is not a peer) are not limited."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self._left: dict[str, tuple[float, float]] = {}  # sender -> (messages it may still send, when counted)

    def allow(self, user_id: str | None) -> bool:
        if protocol.peer_of(user_id) is None:
            return True
        now = self.clock()
        left, at = self._left.get(user_id, (self.burst, now))
        left = min(self.burst, left + (now - at) * self.rate)
        if len(self._left) > 100_000:  # a budget per registered peer: this many means they come and go
            self._left.clear()
        self._left[user_id] = (left - 1, now) if left >= 1 else (left, now)
        return left >= 1


class Dropped(Exception):
    """What a peer sent is not believed: `reason` (a short key, counted) and `detail` (for the log)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Outcome:
    """What the platform decided about one task: `trained` (with its checked result) or `left_out` (with why).

    Made only here, from a recorded assignment; stored once on it, and counted in its round's chord."""

    task: str
    peer: str
    round: int
    kind: str
    result: dict[str, Any] | None = None
    reason: str | None = None

    @property
    def left_out(self) -> bool:
        return self.kind == LEFT_OUT

    def stored(self) -> dict[str, Any]:
        """The decision as the assignment keeps it (its task, peer and round are the assignment's own)."""
        return {"kind": self.kind, "result": self.result, "reason": self.reason}

    def to_message(self) -> dict[str, Any]:
        """As the coordinator passes it between its own tasks (a chord's results)."""
        return {"task": self.task, "peer": self.peer, "round": self.round, **self.stored()}

    @classmethod
    def from_message(cls, data: dict[str, Any]) -> Outcome:
        if data.get("kind") not in (TRAINED, LEFT_OUT):
            raise ValueError(f"not an outcome: {str(data)[:200]}")
        return cls(data["task"], data["peer"], data["round"], data["kind"], data.get("result"), data.get("reason"))

    @classmethod
    def of(cls, assignment: dict[str, Any]) -> Outcome | None:
        """The outcome decided for `assignment`, or None while it is open."""
        decided = assignment.get("outcome")
        if not decided:
            return None
        return cls(assignment["_id"], assignment["peer"], assignment["round"], decided["kind"],
                   decided.get("result"), decided.get("reason"))


def trained(assignment: dict[str, Any], result: dict[str, Any]) -> Outcome:
    return Outcome(assignment["_id"], assignment["peer"], assignment["round"], TRAINED, result=result)


def left_out(assignment: dict[str, Any], reason: str) -> Outcome:
    """The verdict for a task whose peer will not report: it failed, went silent, ran past its deadline."""
    return Outcome(assignment["_id"], assignment["peer"], assignment["round"], LEFT_OUT, reason=reason[:500])


def closed(reason: str) -> dict[str, Any]:
    """The stored verdict of tasks still out when their session ended."""
    return {"kind": LEFT_OUT, "result": None, "reason": reason[:500]}


def samples(plan: Any, peer: str) -> int:
    """How many rows `peer`'s update stands for: its shard's rows, by the coordinator's plan."""
    return int(plan.shard_rows[peer])


@dataclass
class Gate:
    """The checks, with the collaborators they need: storage (uploads), a clock (freshness), the assignments."""

    storage: Storage
    clock: Clock
    lookup: Callable[[str], dict[str, Any] | None] = field(default=None)  # task id -> its assignment
    train_time_limit: int = 3600
    dropped: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if self.lookup is None:
            from models import assignment

            self.lookup = assignment.get

    def drop(self, reason: str, detail: str, what: str = "a message") -> None:
        """Count and log something not believed (the first of each kind, then one line in 10,000)."""
        self.dropped[reason] += 1
        if self.dropped[reason] % 10_000 == 1:
            log.warning("dropped %s (%s): %s [%d dropped for this reason so far]", what, reason, detail,
                        self.dropped[reason])

    # --- who ---------------------------------------------------------------------------------------

    @staticmethod
    def sender(user_id: str | None) -> str:
        """The peer a verified broker user is; Dropped for anyone else."""
        name = protocol.peer_of(user_id)
        if name is None:
            raise Dropped("not from a peer", f"sent by broker user {user_id!r}")
        return name

    def _assignment(self, task_id: Any, name: str) -> dict[str, Any]:
        assignment = self.lookup(task_id) if isinstance(task_id, str) else None
        if assignment is None:
            raise Dropped("unknown task", f"peer {name} named task {task_id!r}, which the coordinator never sent")
        if assignment["peer"] != name:
            raise Dropped("not its task", f"peer {name} named task {task_id}, which was given to {assignment['peer']}")
        return assignment

    # --- results -----------------------------------------------------------------------------------

    def report(self, user_id: str | None, size: int, payload: Any) -> tuple[dict[str, Any], Outcome] | None:
        """A peer's reported task outcome, checked: (its assignment, the outcome to decide); None when there is
        nothing to decide (a progress state); Dropped when it is not believed."""
        name = self.sender(user_id)
        if size > protocol.MAX_RESULT_BYTES:
            raise Dropped("too large", f"{size:,} bytes from peer {name}")
        if not (isinstance(payload, dict) and isinstance(payload.get("task_id"), str)
                and payload.get("status") in protocol.RESULT_STATES):
            raise Dropped("malformed", f"from peer {name}")
        assignment = self._assignment(payload["task_id"], name)
        if payload["status"] not in protocol.FINAL_STATES:
            return None  # STARTED, RETRY: nothing to decide
        if assignment.get("outcome") and assignment.get("settled"):
            raise Dropped("already reported", f"task {assignment['_id']} of peer {name} was decided before")
        if payload["status"] == "SUCCESS":
            return assignment, trained(assignment, protocol.train_result(payload.get("result"),
                                                                         assignment["epochs"]))
        return assignment, left_out(assignment, f"failed: {protocol.describe_failure(payload.get('result'))}")

    # --- heartbeats --------------------------------------------------------------------------------

    def heartbeat(self, event: Any, user_id: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """A `task-heartbeat` event, checked: (its assignment, the heartbeat); Dropped when it is not believed."""
        name = self.sender(user_id)
        try:
            beat = protocol.heartbeat(event)
        except ValueError as exc:
            raise Dropped("malformed heartbeat", f"{exc} in {str(event)[:200]}") from None
        if beat["peer"] != name:
            raise Dropped("not its own heartbeat", f"heartbeat for peer {beat['peer']!r} sent by {user_id!r}")
        assignment = self._assignment(beat["uuid"], name)
        if (str(assignment["session_id"]) != beat["session"] or assignment["round"] != beat["round"]
                or beat["epoch"] > assignment["epochs"]):
            raise Dropped("not its task", f"peer {name}: session {beat['session']} round {beat['round']} epoch "
                                          f"{beat['epoch']} is not task {beat['uuid']}'s")
        decided = assignment.get("reported_at")
        if assignment.get("outcome") and decided is not None and decided + HEARTBEAT_GRACE < self.clock.now():
            raise Dropped("stale heartbeat", f"task {beat['uuid']} of peer {name} was decided at {decided}")
        beat["epochs"] = assignment.get("of") or assignment["epochs"]  # a stretch of a trial: the trial's
        return assignment, beat

    # --- uploads -----------------------------------------------------------------------------------

    def weights(self, key: str, config: Any) -> dict[str, Any] | str:
        """The weights a peer uploaded to `key` (where the coordinator told it to), capped at `config`'s size
        and checked against it; or why they cannot be used."""
        from trainer.weights import WeightsError, max_state_bytes, state_from_bytes

        try:
            return state_from_bytes(self.storage.get_bytes(self.storage.url(key), max_state_bytes(config)), config)
        except (WeightsError, ValueError, StorageError) as exc:
            return str(exc)

    # --- what a peer may touch -----------------------------------------------------------------------

    @property
    def grant_seconds(self) -> int:
        return self.train_time_limit + GRANT_SLACK_SECONDS

    def grants(self, task_id: str, data_url: str, weights_key: str, config: Any,
               initial_url: str | None = None, initial: bytes | None = None) -> dict[str, Any]:
        """Task `task_id`'s doors to storage: read its data (and its starting weights: `initial`, the object at
        `initial_url` when given, travels in the task itself), write its weights, nothing else; each ends with the
        task where storage can end it (local storage: webapp/objects.py)."""
        from trainer.weights import max_state_bytes

        seconds = self.grant_seconds
        starting = None
        if initial is not None:
            starting = transfer.inline(initial)
        elif initial_url:
            starting = self.storage.grant_read(initial_url, seconds, task=task_id)
        return {
            "data": self.storage.grant_read(data_url, seconds, task=task_id),
            "data_id": data_url,  # names the object for the peer's cache; opens nothing
            "initial_weights": starting,
            "weights": self.storage.grant_write(weights_key, seconds, max_state_bytes(config), task=task_id),
        }

    def checkpoint_grants(self, task_id: str, key: str, config: Any, epochs: int, every: int,
                          resume: bool) -> dict[str, Any]:
        """Task `task_id`'s door to its own training state at `key`: write it every `every` epochs, and (`resume`)
        read the one a task of its run wrote before, if storage holds one. The state is the peer's own work:
        a bad one spoils only its own run, whose model the coordinator scores anyway."""
        from trainer import resume as training_state

        if not every:
            return {}
        seconds, url = self.grant_seconds, self.storage.url(key)
        found = resume and self.storage.exists(url)
        return {"checkpoint": self.storage.grant_write(key, seconds, training_state.max_bytes(config, epochs),
                                                       task=task_id),
                "checkpoint_every": every,
                "resume_from": self.storage.grant_read(url, seconds, task=task_id) if found else None}
