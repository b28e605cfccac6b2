"""Training sessions: what a user asked for, what each peer did, and how it ended."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from bson import ObjectId
from mongoengine import (
    DateTimeField,
    DictField,
    Document,
    EmbeddedDocument,
    EmbeddedDocumentField,
    EmbeddedDocumentListField,
    FloatField,
    IntField,
    ListField,
    ObjectIdField,
    StringField,
    ValidationError,
)

from models import event as events
from models.db import utcnow

PENDING = "PENDING"
RUNNING = "RUNNING"
COMPLETED = "COMPLETED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
STATUSES = (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED)
ACTIVE = (PENDING, RUNNING)

SWEEP = "sweep"
FEDERATED = "federated"
MODES = (SWEEP, FEDERATED)


class Dataset(EmbeddedDocument):
    """The uploaded CSV as stored, and what validating it found."""

    filename = StringField(required=True)
    url = StringField(required=True)
    bytes = IntField(required=True, min_value=0)
    sha256 = StringField(required=True)
    rows = IntField(required=True, min_value=1)
    columns = IntField(required=True, min_value=1)
    classes = ListField(StringField(), default=None)


class PeerRun(EmbeddedDocument):
    """One peer's part in a session: its settings, live progress and final result."""

    name = StringField(required=True)
    status = StringField(choices=STATUSES, default=PENDING)
    hyperparameters = DictField()
    task_id = StringField()
    round = IntField(default=0)
    epoch = IntField(default=0)
    epochs = IntField()
    loss = FloatField()
    accuracy = FloatField()
    val_loss = FloatField()
    val_accuracy = FloatField()
    val_r2 = FloatField()
    samples_per_sec = FloatField()
    updated_at = DateTimeField()
    final = DictField()
    samples = IntField()
    bytes_fetched = IntField(default=0)
    weights_url = StringField()
    error = StringField()


class Round(EmbeddedDocument):
    """One federated round as the coordinator aggregated it (asynchronous: one fold, `round` its version - 1)."""

    round = IntField(required=True)
    metrics = DictField()
    peers = ListField(StringField())
    rejected = DictField()
    outliers = DictField()
    updates = ListField(DictField())  # asynchronous: {seq, peer, staleness, weight} of each update folded
    finished_at = DateTimeField(default=utcnow)


class TrainingSession(Document):
    """A user's request to train, from upload to result."""

    owner_id = ObjectIdField(required=True)
    status = StringField(required=True, choices=STATUSES, default=PENDING)
    mode = StringField(required=True, choices=MODES, default=SWEEP)
    task = StringField(required=True, choices=("classification", "regression"), default="classification")
    target = StringField(required=True)
    features = ListField(StringField())
    seed = IntField(default=0)
    dataset = EmbeddedDocumentField(Dataset, required=True)
    peers = EmbeddedDocumentListField(PeerRun)
    federated = DictField()  # the user's federated settings: rounds, local_epochs, partition, ...
    min_peers = IntField(min_value=1)  # peers that must finish a round for the session to go on (None: all)
    round_timeout = IntField(min_value=1)  # seconds a round may take before peers still training are left out
    plan = DictField()  # the coordinator's: where each shard is, normalisation, the model's shape
    launch = DictField()  # the current round's chord: round, group id, body id, peers in header order
    rounds = EmbeddedDocumentListField(Round)
    results = DictField()
    model_url = StringField()
    reason = StringField()
    created_at = DateTimeField(default=utcnow)
    started_at = DateTimeField()
    deadline = DateTimeField()
    finished_at = DateTimeField()

    meta = {
        "collection": "sessions",
        "indexes": [("owner_id", "-created_at"), "status", "peers.task_id"],
        "ordering": ["-created_at"],
    }

    def clean(self) -> None:
        names = [p.name for p in self.peers]
        if len(set(names)) != len(names):
            raise ValidationError("a peer appears twice in one session")

    def peer(self, name: str) -> PeerRun:
        """This session's run on peer `name`."""
        for run in self.peers:
            if run.name == name:
                return run
        raise KeyError(name)

    @property
    def finished(self) -> bool:
        return self.status not in ACTIVE

    @property
    def quorum(self) -> int:
        """How many peers must finish each round (the federated settings' `min_peers` in older sessions)."""
        return self.min_peers or self.federated.get("min_peers") or len(self.peers)

    def can_lose(self, peer: str) -> bool:
        """True if the session can go on without `peer` (enough peers that have not failed remain)."""
        remaining = sum(1 for run in self.peers if run.name != peer and run.status != FAILED)
        return remaining >= self.quorum


def for_owner(owner_id: ObjectId) -> Any:
    """A user's sessions, newest first."""
    return TrainingSession.objects(owner_id=owner_id).order_by("-created_at")


def get_owned(session_id: str, owner_id: ObjectId) -> TrainingSession | None:
    """The session if it exists and belongs to `owner_id`; None otherwise (so callers answer 404 to both)."""
    if not ObjectId.is_valid(session_id):
        return None
    return TrainingSession.objects(id=session_id, owner_id=owner_id).first()


def _collection():
    return TrainingSession._get_collection()


def positions(session: TrainingSession) -> dict[str, int]:
    """Each peer's place in the session's runs (set when the session is made; runs never move)."""
    return {run.name: i for i, run in enumerate(session.peers)}


def _task_updates(session_id: ObjectId, task_ids: dict[str, str], position: dict[str, int] | None) -> dict[str, Any]:
    if position is None:
        names = TrainingSession.objects(id=session_id).scalar("peers").first() or []
        position = {run.name: i for i, run in enumerate(names)}
    updates: dict[str, Any] = {}
    for name, task_id in task_ids.items():
        updates[f"peers.{position[name]}.task_id"] = task_id
        updates[f"peers.{position[name]}.status"] = RUNNING
    return updates


def view(session_id: str, owner_id: ObjectId) -> dict[str, Any] | None:
    """A session as a plain dict, for reading only: skipping document objects halves the API's cost."""
    if not ObjectId.is_valid(session_id):
        return None
    return TrainingSession.objects(id=session_id, owner_id=owner_id).exclude("plan", "launch").as_pymongo().first()


def start_running(session_id: ObjectId, task_ids: dict[str, str], launch: dict[str, Any],
                  deadline_seconds: float, position: dict[str, int] | None = None) -> bool:
    """PENDING → RUNNING, recording each peer's task id and the chord; False if the session is no longer pending."""
    now = utcnow()
    # Raw updates, built directly: mongoengine's keyword transform costs ~0.1 ms per path, and a
    # thousand-peer round sets thousands of paths.
    started = _collection().update_one({"_id": session_id, "status": PENDING}, {"$set": {
        "status": RUNNING, "started_at": now, "deadline": now + timedelta(seconds=deadline_seconds),
        "launch": launch, **_task_updates(session_id, task_ids, position)}}).modified_count
    if started:
        events.append(session_id, [events.status(RUNNING, at=now), *(events.peer(name, RUNNING) for name in task_ids)])
    return bool(started)


def next_round(session_id: ObjectId, round_: int, task_ids: dict[str, str], launch: dict[str, Any],
               position: dict[str, int] | None = None) -> bool:
    """Record round `round_`'s task ids and chord on a RUNNING session whose current round is the one before;
    False if it has ended meanwhile, or the round was launched already (a redelivered `aggregate`)."""
    updates = _task_updates(session_id, task_ids, position)
    return bool(_collection().update_one({"_id": session_id, "status": RUNNING, "launch.round": round_ - 1},
                                         {"$set": {"launch": launch, **updates}}).modified_count)


def rounds_overdue(now: datetime) -> list[TrainingSession]:
    """Running sessions whose current round is past its deadline (`round_timeout`)."""
    return list(TrainingSession.objects(status=RUNNING, launch__deadline__lt=now).only("id", "launch", "peers"))


def overdue(now: datetime, pending_for: timedelta) -> list[TrainingSession]:
    """Running sessions past their deadline, and pending ones no coordinator picked up in time."""
    running = TrainingSession.objects(status=RUNNING, deadline__lt=now).only("id", "status")
    pending = TrainingSession.objects(status=PENDING, created_at__lt=now - pending_for).only("id", "status")
    return [*running, *pending]


def finish(session_id: ObjectId, status: str, reason: str | None = None, **fields: Any) -> bool:
    """Move an active session to a final status once; False if it had already ended."""
    assert status in (COMPLETED, FAILED, CANCELLED)
    updates = {f"set__{name}": value for name, value in fields.items()}
    if reason is not None:
        updates["set__reason"] = reason
    now = utcnow()
    ended = TrainingSession.objects(id=session_id, status__in=ACTIVE).update_one(
        set__status=status, set__finished_at=now, **updates
    )
    if ended:
        # Only the one ending wins the update above, so a session's log ends once.
        events.append(session_id, [events.status(status, reason, at=now), events.end(status, reason)])
    return bool(ended)


def by_task_id(task_id: str) -> TrainingSession | None:
    """The session one of whose peers runs task `task_id`."""
    return TrainingSession.objects(peers__task_id=task_id).first()


def current_task(task_id: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(the session: id, status, mode, federated, launch; the peer run given task `task_id`), or None.

    One indexed read of one run: the session is named by the task id (tasks/rounds.py makes them
    `<session>:<round>:<uuid>`; older ids are looked up by the run alone), and only the matching
    run of its peers is read, however many peers the session has."""
    query: dict[str, Any] = {"peers.task_id": task_id}
    named = task_id.split(":", 1)[0]
    if ObjectId.is_valid(named):
        query["_id"] = ObjectId(named)
    found = TrainingSession._get_collection().find_one(
        query, {"status": 1, "mode": 1, "federated": 1, "launch": 1, "peers": {"$elemMatch": {"task_id": task_id}}})
    if not found or not found.get("peers"):
        return None
    return found, found["peers"][0]


def record_runs(session_id: ObjectId, position: dict[str, int], changes: dict[str, dict[str, Any]],
                before: dict[str, str] | None = None, added: dict[str, dict[str, int]] | None = None,
                active_only: bool = False) -> None:
    """Set fields of several peers' runs in one update (`changes[peer]`: field -> value, `status` among them),
    and add to counters (`added`); a peer whose `status` differs from `before` gets its `peer` event.
    `active_only`: only while the session is active (a finished session's record no longer changes)."""
    sets = {f"peers.{position[name]}.{field}": value for name, fields in changes.items()
            for field, value in fields.items()}
    incs = {f"peers.{position[name]}.{field}": value for name, fields in (added or {}).items()
            for field, value in fields.items() if value}
    if not sets and not incs:
        return
    query: dict[str, Any] = {"_id": ObjectId(session_id)}
    if active_only:
        query["status"] = {"$in": list(ACTIVE)}
    _collection().update_one(query, {"$set": sets, **({"$inc": incs} if incs else {})})
    changed = [events.peer(name, fields["status"], fields.get("error")) for name, fields in changes.items()
               if "status" in fields and (before is None or before.get(name) != fields["status"])]
    if changed:
        events.append_new(session_id, changed)


def run_of_task(session: TrainingSession, task_id: str) -> PeerRun | None:
    """The peer run that was given task `task_id` in `session`'s current round."""
    return next((run for run in session.peers if run.task_id == task_id), None)


def record_progress(session_id: ObjectId, peer: str, fields: dict[str, Any]) -> None:
    """Set a peer's latest progress (from its newest heartbeat) on the session, while it is active."""
    updates = {f"set__peers__S__{name}": value for name, value in fields.items()}
    TrainingSession.objects(id=session_id, peers__name=peer, status__in=ACTIVE).update_one(**updates)


def assignments(session_id: ObjectId) -> dict[str, Any] | None:
    """What an active session's peers are training now: {round, peers: {name: (position, epochs, round)}}, or None.

    `peers` holds the peers of the current round only, with their place among the session's runs, the
    epochs each trains per round and the round it trains; `round` is the newest of them. Asynchronous
    sessions have no common round: each peer's is its current task's number (`<session>:<n>:<uuid>`).
    None when the session is not active."""
    doc = TrainingSession._get_collection().find_one(
        {"_id": ObjectId(session_id), "status": {"$in": list(ACTIVE)}},
        {"launch.round": 1, "launch.peers": 1, "mode": 1, "federated.local_epochs": 1, "federated.schedule": 1,
         "peers.name": 1, "peers.hyperparameters.epochs": 1, "peers.task_id": 1, "peers.status": 1})
    if doc is None:
        return None
    launch = doc.get("launch") or {}
    current = set(launch.get("peers") or [])
    federated = doc.get("federated") or {}
    local = federated.get("local_epochs") if doc.get("mode") == FEDERATED else None
    apart = federated.get("schedule") == "async"
    found, newest = {}, launch.get("round")
    for i, run in enumerate(doc.get("peers") or []):
        if run.get("name") not in current:
            continue
        round_ = launch.get("round")
        if apart:
            parts = (run.get("task_id") or "").split(":")
            if run.get("status") != RUNNING or len(parts) != 3 or not parts[1].isdigit():
                continue
            round_ = int(parts[1])
            newest = max(newest or 0, round_)
        found[run["name"]] = (i, local if local is not None else (run.get("hyperparameters") or {}).get("epochs"),
                              round_)
    return {"round": newest, "peers": found}


def add_bytes_fetched(session_id: ObjectId, peer: str, count: int) -> None:
    if count:
        TrainingSession.objects(id=session_id, peers__name=peer).update_one(inc__peers__S__bytes_fetched=count)


def record_peer_result(session_id: ObjectId, peer: str, status: str, **fields: Any) -> None:
    """Record how a peer's run ended (or, federated, a round of it); a new status is logged as a `peer` event."""
    updates = {f"set__peers__S__{name}": value for name, value in fields.items()}
    if TrainingSession.objects(id=session_id, peers__name=peer).update_one(set__peers__S__status=status, **updates):
        events.append_new(session_id, [events.peer(peer, status, fields.get("error"))])
