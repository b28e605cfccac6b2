"""Training sessions: what a user asked for, what each peer did, and how it ended.

A session's settings and the coordinator's state are typed embedded documents: `FederatedSettings`
(what the user chose), `Plan` (where the coordinator put the data and the model), `Launch` (the current
round's chord), `AsyncState` (an asynchronous session's budget and global version). Every write the
coordinator makes to them is a query of this module.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from bson import ObjectId
from mongoengine import (
    BooleanField,
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
from pymongo import ReturnDocument

from models import event as events
from models.db import utcnow

PENDING = "PENDING"
RUNNING = "RUNNING"
COMPLETED = "COMPLETED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
# The platform stopped or crashed under it: nobody's fault, and it can be resumed (`resume`).
INTERRUPTED = "INTERRUPTED"
STATUSES = (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, INTERRUPTED)
ACTIVE = (PENDING, RUNNING)

# The words a session is made of; which code runs for each is decided once (tasks/strategy.py).
SWEEP = "sweep"
FEDERATED = "federated"
MODES = (SWEEP, FEDERATED)
SYNC = "sync"
ASYNC = "async"
SCHEDULES = (SYNC, ASYNC)
AGGREGATIONS = ("fedavg", "median", "trimmed_mean")
# A federated session's algorithm (trainer/serveropt.py keeps the same list: models do not import the trainer).
ALGORITHMS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedprox", "scaffold")
# What a label-skewed session uses unless its user picks: the algorithm that met the targets on both skewed
# datasets of bench/federated.py (docs/benchmarks.md "Federated algorithms on skewed shards").
SKEWED_DEFAULT = "scaffold"
PARTITIONS = ("iid", "label_skew")


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
    task_id = StringField()  # the task it trains now (models/assignment.py has every task it was sent)
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
    accepted = IntField(default=0)  # its updates (or model) the coordinator used
    rejected = IntField(default=0)  # ... and refused (the round's `rejected` says why)


class FederatedSettings(EmbeddedDocument):
    """What the user chose for a federated session."""

    meta = {"strict": False}  # older sessions kept min_peers here too (TrainingSession.min_peers is its home)

    rounds = IntField(min_value=1, default=5)
    local_epochs = IntField(min_value=1, default=1)
    partition = StringField(choices=PARTITIONS, default="iid")
    alpha = FloatField(default=0.5)
    aggregation = StringField(choices=AGGREGATIONS, default="fedavg")
    schedule = StringField(choices=SCHEDULES, default=SYNC)
    buffer_size = IntField(min_value=1)  # asynchronous: updates folded at once
    max_updates = IntField(min_value=1)  # asynchronous: tasks handed out in all
    time_budget = IntField(min_value=1)  # asynchronous: seconds after which no task is handed out
    algorithm = StringField(choices=ALGORITHMS, default="fedavg")  # how the peers' work becomes the global model
    mu = FloatField()  # fedprox: the proximal term's weight
    server_lr = FloatField()  # fedavgm, fedadam, fedyogi: the server optimizer's step (None: its default)

    def epochs_per_peer(self) -> int | None:
        """Epochs each peer trains in all; None when it depends on the peer's speed (asynchronous)."""
        return None if self.schedule == ASYNC else self.rounds * self.local_epochs


class Plan(EmbeddedDocument):
    """The coordinator's own record of a federated session's data and model: no peer's word in it."""

    meta = {"strict": False}

    shards = DictField()  # peer -> its shard's URL (a sweep's peers share one: every training row)
    shard_rows = DictField()  # peer -> rows in its shard (the sample counts aggregation weighs by)
    validation_url = StringField()
    validation_rows = IntField()
    normalization = DictField()
    classes = ListField(StringField(), default=None)
    model = DictField()  # trainer.model.ModelConfig.to_dict()
    initial_url = StringField()
    global_url = StringField()
    server_url = StringField()  # the server optimizer's state after the last round or fold (FedOpt)


class Launch(EmbeddedDocument):
    """The current round's chord: its number, group and body ids, the peers in header order."""

    meta = {"strict": False}

    round = IntField(required=True)
    group = StringField()
    body = StringField()
    peers = ListField(StringField())
    started_at = DateTimeField()
    sent = BooleanField(default=False)  # its tasks were handed to the broker (a redelivered launch resends otherwise)


class AsyncState(EmbeddedDocument):
    """An asynchronous session's counters: the global version, tasks sent and left, the fold lease."""

    meta = {"strict": False}

    version = IntField(default=0)
    sent = IntField(default=0)
    remaining = IntField(default=0)
    folding = DateTimeField()  # when a coordinator took the fold lease (None: free)
    stop_at = DateTimeField()  # the time budget's end


class SearchState(EmbeddedDocument):
    """A sweep that searches: its space (trainer/search.py's normal form), budget and rules, and its counters."""

    meta = {"strict": False}

    space = DictField()
    trials = IntField(min_value=1)  # configurations to try in all
    sampler = StringField(default="tpe")
    pruner = StringField(default="asha")
    time_budget = IntField(min_value=1)  # seconds after which no trial is begun or continued
    asked = IntField(default=0)  # trials begun
    tasks = IntField(default=0)  # tasks sent (a task's number is its `round`)
    stop_at = DateTimeField()


class History(EmbeddedDocument):
    """What recently accepted updates measured (their change's size, their held-out loss change, relative):
    what a round or fold of a few updates is judged against (trainer/screening.py)."""

    norms = ListField(FloatField())
    gains = ListField(FloatField())


class Round(EmbeddedDocument):
    """One federated round as the coordinator aggregated it (asynchronous: one fold, `round` its version - 1)."""

    round = IntField(required=True)
    metrics = DictField()
    peers = ListField(StringField())
    rejected = DictField()
    outliers = DictField()
    updates = ListField(DictField())  # asynchronous: {seq, peer, staleness, weight} of each update folded
    model_url = StringField()  # its global model as a file a user downloads (GET /sessions/<id>/model?round=N)
    finished_at = DateTimeField(default=utcnow)


class TrainingSession(Document):
    """A user's request to train, from upload to result."""

    owner_id = ObjectIdField(required=True)
    status = StringField(required=True, choices=STATUSES, default=PENDING)
    mode = StringField(required=True, choices=MODES, default=SWEEP)
    pool = StringField(default="public")  # whose peers it claims: public, mine, or a pool's name
    elastic = BooleanField(default=False)  # peers that come online while it runs join it (up to max_peers)
    max_peers = IntField(min_value=1)
    task = StringField(required=True, choices=("classification", "regression"), default="classification")
    target = StringField(required=True)
    features = ListField(StringField())
    seed = IntField(default=0)
    # Splits the held-out rows from the training rows: the platform's secret, never sent to a peer (the
    # `seed` above is the user's, for the peers' training).
    split_seed = IntField()
    dataset = EmbeddedDocumentField(Dataset, required=True)
    peers = EmbeddedDocumentListField(PeerRun)
    federated = EmbeddedDocumentField(FederatedSettings)
    min_peers = IntField(min_value=1)  # peers that must finish a round for the session to go on (None: all)
    round_timeout = IntField(min_value=1)  # seconds a task may take before its peer is left out
    plan = EmbeddedDocumentField(Plan)
    launch = EmbeddedDocumentField(Launch)
    asynchronous = EmbeddedDocumentField(AsyncState, db_field="async_state")
    search = EmbeddedDocumentField(SearchState)
    history = EmbeddedDocumentField(History)
    rounds = EmbeddedDocumentListField(Round)
    results = DictField()
    model_url = StringField()
    reason = StringField()
    created_at = DateTimeField(default=utcnow)
    resumes = IntField(default=0)  # times it was resumed after an interruption
    resumed_at = DateTimeField()
    started_at = DateTimeField()
    deadline = DateTimeField()
    finished_at = DateTimeField()

    meta = {
        "collection": "sessions",
        # peers.name: a peer's history for its owner (GET /peers/<name>) without reading every session.
        "indexes": [("owner_id", "-created_at"), "status", "peers.task_id", "peers.name"],
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
        """How many peers must finish each round."""
        return self.min_peers or len(self.peers)

    def can_lose(self, peer: str) -> bool:
        """True if the session can go on without `peer` (enough peers that have not failed remain)."""
        remaining = sum(1 for run in self.peers if run.name != peer and run.status != FAILED)
        return remaining >= self.quorum

    def in_play(self) -> list[PeerRun]:
        """The runs of peers not given up on."""
        return [run for run in self.peers if run.status != FAILED]


def for_owner(owner_id: ObjectId) -> Any:
    """A user's sessions, newest first."""
    return TrainingSession.objects(owner_id=owner_id).order_by("-created_at")


def get_owned(session_id: str, owner_id: ObjectId) -> TrainingSession | None:
    """The session if it exists and belongs to `owner_id`; None otherwise (so callers answer 404 to both)."""
    if not ObjectId.is_valid(session_id):
        return None
    return TrainingSession.objects(id=session_id, owner_id=owner_id).first()


def starting_with(prefix: str, owner_id: ObjectId, limit: int = 2) -> list[ObjectId]:
    """The ids of `owner_id`'s sessions whose hex begins with `prefix` (at most `limit` of them)."""
    low, high = ObjectId(prefix.ljust(24, "0")), ObjectId(prefix.ljust(24, "f"))
    return list(TrainingSession.objects(owner_id=owner_id, id__gte=low, id__lte=high).limit(limit).scalar("id"))


def load(session_id: Any) -> TrainingSession | None:
    """A session by its id (None if there is none, or the id is not one)."""
    if not ObjectId.is_valid(str(session_id)):
        return None
    return TrainingSession.objects(id=session_id).first()


def _collection():
    return TrainingSession._get_collection()


def positions(session: TrainingSession) -> dict[str, int]:
    """Each peer's place in the session's runs (set when the session is made; runs never move)."""
    return {run.name: i for i, run in enumerate(session.peers)}


def _task_updates(task_ids: dict[str, str], position: dict[str, int], rounds: dict[str, int]) -> dict[str, Any]:
    updates: dict[str, Any] = {}
    for name, task_id in task_ids.items():
        updates[f"peers.{position[name]}.task_id"] = task_id
        updates[f"peers.{position[name]}.status"] = RUNNING
        updates[f"peers.{position[name]}.round"] = rounds[name]
    return updates


def view(session_id: str, owner_id: ObjectId) -> dict[str, Any] | None:
    """A session as a plain dict, for reading only: skipping document objects halves the API's cost."""
    if not ObjectId.is_valid(session_id):
        return None
    return TrainingSession.objects(id=session_id, owner_id=owner_id).exclude(
        "plan", "launch", "asynchronous", "split_seed", "history").as_pymongo().first()


def start_running(session_id: ObjectId, task_ids: dict[str, str], launch: Launch, deadline_seconds: float,
                  position: dict[str, int], at: datetime, state: AsyncState | None = None,
                  rounds: dict[str, int] | None = None, sets: dict[str, Any] | None = None) -> bool:
    """PENDING → RUNNING, recording each peer's task id (of round `rounds[peer]`, default the launch's) and the
    chord (and an asynchronous session's counters); False if the session is no longer pending."""
    rounds = rounds or dict.fromkeys(task_ids, launch.round)
    # Raw updates, built directly: mongoengine's keyword transform costs ~0.1 ms per path, and a
    # thousand-peer round sets thousands of paths.
    sets = {"status": RUNNING, "started_at": at, "deadline": at + timedelta(seconds=deadline_seconds),
            "launch": launch.to_mongo().to_dict(), **_task_updates(task_ids, position, rounds), **(sets or {})}
    if state is not None:
        sets["async_state"] = state.to_mongo().to_dict()
    started = _collection().update_one({"_id": session_id, "status": PENDING}, {"$set": sets}).modified_count
    if started:
        events.append(session_id, [events.status(RUNNING, at=at), *(events.peer(name, RUNNING) for name in task_ids)])
    return bool(started)


def next_round(session_id: ObjectId, task_ids: dict[str, str], launch: Launch, position: dict[str, int]) -> bool:
    """Record round `launch.round`'s task ids and chord on a RUNNING session whose current round is the one
    before; False if it has ended meanwhile, or the round was launched already (a redelivered `aggregate`)."""
    sets = {"launch": launch.to_mongo().to_dict(),
            **_task_updates(task_ids, position, dict.fromkeys(task_ids, launch.round))}
    return bool(_collection().update_one({"_id": session_id, "status": RUNNING, "launch.round": launch.round - 1},
                                         {"$set": sets}).modified_count)


def launched(session_id: ObjectId, round_: int) -> None:
    """Round `round_`'s tasks are with the broker."""
    _collection().update_one({"_id": session_id, "launch.round": round_}, {"$set": {"launch.sent": True}})


def record_plan(session_id: ObjectId, plan: Plan) -> None:
    TrainingSession.objects(id=session_id).update_one(set__plan=plan)


def record_round(session_id: ObjectId, round_doc: Round, global_url: str, history: History,
                 server_url: str | None = None) -> bool:
    """Add a synchronous round's result (and the screening history and server optimizer's state after it) once;
    False if it ended meanwhile or the round is recorded already."""
    return bool(_collection().update_one(
        {"_id": session_id, "status": RUNNING, "rounds.round": {"$ne": round_doc.round}},
        {"$push": {"rounds": round_doc.to_mongo().to_dict()},
         "$set": {"plan.global_url": global_url, "plan.server_url": server_url,
                  "history": history.to_mongo().to_dict()}}).modified_count)


def measured_round(session_id: ObjectId, round_: int, metrics: dict[str, Any], model_url: str) -> bool:
    """A recorded round's held-out measures and kept model, once (False: measured already, or the session ended).
    A round is recorded first and measured once the next round's tasks are out."""
    return bool(_collection().update_one(
        {"_id": session_id, "status": RUNNING, "rounds": {"$elemMatch": {"round": round_, "model_url": None}}},
        {"$set": {"rounds.$.metrics": metrics, "rounds.$.model_url": model_url}}).modified_count)


def record_fold(session_id: ObjectId, version: int, round_doc: Round, global_url: str, history: History,
                server_url: str | None = None) -> bool:
    """An asynchronous session's new global version (and the screening history and server optimizer's state
    after it), once: False if another fold or the session's end came first."""
    return bool(_collection().update_one(
        {"_id": session_id, "status": RUNNING, "async_state.version": version},
        {"$push": {"rounds": round_doc.to_mongo().to_dict()},
         "$set": {"async_state.version": version + 1, "plan.global_url": global_url, "plan.server_url": server_url,
                  "history": history.to_mongo().to_dict()}}).modified_count)


def count_updates(session_id: ObjectId, position: dict[str, int], accepted: list[str], rejected: list[str]) -> None:
    """Add to the peers' runs how many of their updates were used and refused (a name once per update)."""
    incs: dict[str, int] = {}
    for field, names in (("accepted", accepted), ("rejected", rejected)):
        for name in names:
            key = f"peers.{position[name]}.{field}"
            incs[key] = incs.get(key, 0) + 1
    if incs:
        _collection().update_one({"_id": ObjectId(session_id)}, {"$inc": incs})


def take_task(session_id: ObjectId, peer: str, now: datetime, refusals: int) -> tuple[int, int, str] | None:
    """An asynchronous session's next task for `peer`, from its budget: (its number, the global version, where
    the global weights are); None when the budget or the time is spent, the session ended, gave up on the peer,
    or refused `refusals` of its updates already (its tasks would only spend the budget)."""
    taken = _collection().find_one_and_update(
        {"_id": session_id, "status": RUNNING, "async_state.remaining": {"$gt": 0},
         "$or": [{"async_state.stop_at": None}, {"async_state.stop_at": {"$gt": now}}],
         "peers": {"$elemMatch": {"name": peer, "status": {"$ne": FAILED}, "rejected": {"$not": {"$gte": refusals}}}}},
        {"$inc": {"async_state.remaining": -1, "async_state.sent": 1}},
        projection={"async_state": 1, "plan.global_url": 1}, return_document=ReturnDocument.AFTER)
    if taken is None:
        return None
    state = taken["async_state"]
    return state["sent"] - 1, state["version"], taken["plan"]["global_url"]


def take_trial(session_id: ObjectId, now: datetime) -> int | None:
    """A searching sweep's next trial number, while its budget of trials and time lasts; None when spent."""
    taken = _collection().find_one_and_update(
        {"_id": session_id, "status": RUNNING, "$expr": {"$lt": ["$search.asked", "$search.trials"]},
         "$or": [{"search.stop_at": None}, {"search.stop_at": {"$gt": now}}]},
        {"$inc": {"search.asked": 1}}, projection={"search.asked": 1}, return_document=ReturnDocument.AFTER)
    return None if taken is None else taken["search"]["asked"] - 1


def take_task_number(session_id: ObjectId) -> int:
    """A searching sweep's next task number."""
    taken = _collection().find_one_and_update({"_id": session_id}, {"$inc": {"search.tasks": 1}},
                                              projection={"search.tasks": 1}, return_document=ReturnDocument.AFTER)
    return taken["search"]["tasks"] - 1


def give_back(session_id: ObjectId, tasks: int) -> None:
    """Return unanswered tasks to an asynchronous session's budget."""
    if tasks:
        _collection().update_one({"_id": session_id}, {"$inc": {"async_state.remaining": tasks}})


def take_fold_lease(session_id: ObjectId, now: datetime, lease: timedelta) -> bool:
    """The right to fold, for one coordinator at a time (a lease left by a dead one expires after `lease`)."""
    return bool(_collection().update_one(
        {"_id": session_id, "status": RUNNING,
         "$or": [{"async_state.folding": None}, {"async_state.folding": {"$lt": now - lease}}]},
        {"$set": {"async_state.folding": now}}).modified_count)


def drop_fold_lease(session_id: ObjectId) -> None:
    _collection().update_one({"_id": session_id}, {"$set": {"async_state.folding": None}})


def fold_leased(session_id: ObjectId) -> bool:
    doc = _collection().find_one({"_id": session_id}, {"async_state.folding": 1})
    return bool(doc and (doc.get("async_state") or {}).get("folding"))


def overdue(now: datetime, pending_for: timedelta) -> list[TrainingSession]:
    """Running sessions past their deadline, and pending ones no coordinator picked up in time."""
    running = TrainingSession.objects(status=RUNNING, deadline__lt=now).only("id", "status")
    waited = now - pending_for
    pending = TrainingSession.objects(status=PENDING, created_at__lt=waited).only("id", "status", "resumed_at")
    return [*running, *(s for s in pending if s.resumed_at is None or s.resumed_at < waited)]


def resume(session_id: ObjectId, at: datetime) -> bool:
    """INTERRUPTED → PENDING, once: its peers' runs not given up on wait again, the interrupted round's launch is
    forgotten (the coordinator launches the first round not recorded), what was done is kept."""
    doc = _collection().find_one({"_id": session_id, "status": INTERRUPTED},
                                 {"peers.status": 1, "finished_at": 1, "async_state.stop_at": 1, "search.stop_at": 1})
    if doc is None:
        return False
    sets: dict[str, Any] = {"status": PENDING, "resumed_at": at, "deadline": None, "finished_at": None,
                            "reason": None}
    stopped = doc.get("finished_at")
    for state in ("async_state", "search"):
        stop_at = (doc.get(state) or {}).get("stop_at")
        if stop_at is not None and stopped is not None:
            sets[f"{state}.stop_at"] = at + max(stop_at - stopped, timedelta(0))  # the time budget it had left
    for i, run in enumerate(doc.get("peers", [])):
        if run.get("status") != FAILED:
            sets[f"peers.{i}.status"] = PENDING
    resumed = _collection().update_one({"_id": session_id, "status": INTERRUPTED},
                                       {"$set": sets, "$unset": {"launch": ""}, "$inc": {"resumes": 1}})
    if not resumed.modified_count:
        return False
    # The log goes on after the interruption's end: a stream reading it from the start passes that end by.
    events.begin_attempt(session_id)
    events.append(session_id, [events.status(PENDING, "resumed", at=at)])
    return True


def finish(session_id: ObjectId, status: str, reason: str | None = None, runs_to: str | None = None,
           **fields: Any) -> bool:
    """Move an active session to a final status once; False if it had already ended.

    `runs_to`: the status its runs still active take, in the same update. Writers of an active session's runs
    (a round's results, an asynchronous dispatch) write only while it is active, so none can set a run
    RUNNING again once it is stopped, and whoever sees the session ended sees its runs ended.
    """
    assert status in (COMPLETED, FAILED, CANCELLED, INTERRUPTED)
    updates = {f"set__{name}": value for name, value in fields.items()}
    if reason is not None:
        updates["set__reason"] = reason
    now = utcnow()
    while True:
        condition: dict[str, Any] = {}
        runs: dict[str, str] = {}
        stopped: list[str] = []
        if runs_to is not None:
            session = TrainingSession.objects(id=session_id, status__in=ACTIVE).only("peers.name",
                                                                                     "peers.status").first()
            if session is None:
                return False
            for i, run in enumerate(session.peers):
                if run.status in ACTIVE:
                    # Still active when written: a run that ended meanwhile fails the update, which is made again.
                    condition[f"peers__{i}__status__in"] = ACTIVE
                    runs[f"set__peers__{i}__status"] = runs_to
                    stopped.append(run.name)
        ended = TrainingSession.objects(id=session_id, status__in=ACTIVE, **condition).update_one(
            set__status=status, set__finished_at=now, **updates, **runs
        )
        if ended or runs_to is None:
            break
    if ended:
        # Only the one ending wins the update above, so a session's log ends once.
        events.append_new(session_id, [events.peer(name, runs_to) for name in stopped])
        events.append(session_id, [events.status(status, reason, at=now), events.end(status, reason)])
    return bool(ended)


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


def record_progress(session_id: ObjectId, peer: str, fields: dict[str, Any]) -> None:
    """Set a peer's latest progress (from its newest heartbeat) on the session, while it is active."""
    updates = {f"set__peers__S__{name}": value for name, value in fields.items()}
    TrainingSession.objects(id=session_id, peers__name=peer, status__in=ACTIVE).update_one(**updates)


def record_peer_result(session_id: ObjectId, peer: str, status: str, **fields: Any) -> None:
    """Record how a peer's run ended (or, federated, a round of it); a new status is logged as a `peer` event."""
    updates = {f"set__peers__S__{name}": value for name, value in fields.items()}
    if TrainingSession.objects(id=session_id, peers__name=peer).update_one(set__peers__S__status=status, **updates):
        events.append_new(session_id, [events.peer(peer, status, fields.get("error"))])


# --- elastic sessions: peers that come online while one runs join it ----------------------------------------

def wanting_peers() -> list[dict[str, Any]]:
    """Running elastic sessions with room for more peers, the oldest first (each: its id, owner, pool, max_peers
    and its runs' names)."""
    found = _collection().find({"status": RUNNING, "elastic": True},
                               {"owner_id": 1, "pool": 1, "max_peers": 1, "peers.name": 1, "created_at": 1})
    return [doc for doc in sorted(found, key=lambda d: d.get("created_at") or datetime.min)
            if len(doc.get("peers") or []) < (doc.get("max_peers") or 0)]


def add_runs(session_id: ObjectId, runs: list[PeerRun], plan: dict[str, Any] | None = None) -> bool:
    """Add the runs of peers that joined a running session (and the plan's entries for them, `plan`: field ->
    value under `plan.`), once; False if it ended, has one of them already, or another addition came first.

    Its quorum stays what it was: a session that needed all its peers to finish each round needs as many as it
    had before it grew (so losing a newcomer, or an early peer once newcomers are in, does not end it)."""
    session = TrainingSession.objects(id=session_id).only("peers", "min_peers", "status").first()
    names = [run.name for run in runs]
    if session is None or session.status != RUNNING or any(run.name in names for run in session.peers):
        return False
    count = len(session.peers)
    sets: dict[str, Any] = {f"plan.{key}": value for key, value in (plan or {}).items()}
    sets["min_peers"] = session.min_peers or count
    done = _collection().update_one(
        {"_id": session_id, "status": RUNNING, "peers": {"$size": count}},
        {"$push": {"peers": {"$each": [run.to_mongo().to_dict() for run in runs]}}, "$set": sets}).modified_count
    if done:
        events.append(session_id, [events.peer(name, PENDING) for name in names])
    return bool(done)


def set_plan(session_id: ObjectId, fields: dict[str, Any]) -> None:
    """Change parts of a session's plan (`fields`: field -> value under `plan.`), e.g. re-split shards."""
    _collection().update_one({"_id": session_id}, {"$set": {f"plan.{key}": value for key, value in fields.items()}})
