"""Asynchronous federated sessions (`schedule=async`): no round waits for the slowest peer.

Every peer gets a `train` task at once, from the current global weights. When a peer reports,
`receive` buffers its update; as soon as `buffer_size` (K) updates wait, their weights are read and
checked as a round checks them (the coordinator's own key, size-capped, shapes, finite values) and folded
into a new global version (trainer/staleness.py: each change weighted down by how many versions old
its starting weights are), which is evaluated on the held-out rows and recorded like a round. That
peer is handed its next task at once, from the newest global weights. The session ends when
`max_updates` tasks have been handed out and answered (or given up on), or `time_budget` seconds
after it started: then what is buffered is folded and the last global model is the session's result.

Every task has its session's next sequence number (`Update.seq`, also the task's `round`, so its
heartbeats are the peer's own per task). Each step is a conditional update, so every coordinator
task here is safe to run twice; folds take a lease on the session (`plan.folding`), so however many
coordinator processes receive updates at once, one folds at a time, and whoever holds the lease
looks again after letting go, so an update that arrived meanwhile is never left waiting.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import timedelta
from functools import lru_cache
from typing import Any

import torch
from celery import uuid
from pymongo import ReturnDocument

from models import Round, TrainingSession, utcnow
from models import event as events
from models import session as sessions
from models import update as updates
from tasks import federated, lifecycle, protocol
from tasks.celery import app
from tasks.rounds import grant_seconds, record_results, session_prefix, settings, storage
from tasks.storage import StorageError
from trainer.model import ModelConfig, SimpleDNN
from trainer.staleness import Contribution, fold
from trainer.weights import WeightsError, max_state_bytes, state_from_bytes, state_to_bytes

log = logging.getLogger(__name__)

ASYNC = "async"
# A fold that has not let go of its lease after this long died with it; the next one takes over.
LEASE_SECONDS = 30


def is_async(session: TrainingSession | dict[str, Any]) -> bool:
    federated_ = session.get("federated") if isinstance(session, dict) else session.federated
    return (federated_ or {}).get("schedule") == ASYNC


def start(session: TrainingSession) -> None:
    """Split the data as a federated session does, then give every peer its first task."""
    initial = federated.prepare(session)
    settings_ = session.federated
    budget = settings_["time_budget"]
    first = min(len(session.peers), settings_["max_updates"])
    now = utcnow()
    TrainingSession.objects(id=session.id).update_one(
        set__plan__version=0, set__plan__global_url=initial, set__plan__sent=first,
        set__plan__remaining=settings_["max_updates"] - first, set__plan__folding=None,
        set__plan__stop_at=now + timedelta(seconds=budget) if budget else None)
    session.reload()
    runs = session.peers[:first]
    tasks = [{"seq": seq, "peer": run.name, "task_id": _task_id(session, seq), "base_version": 0}
             for seq, run in enumerate(runs)]
    launch = {"round": 0, "schedule": ASYNC, "peers": [run.name for run in session.peers], "started_at": now,
              "deadline": None}
    updates.dispatched(session.id, tasks)
    if not sessions.start_running(session.id, {t["peer"]: t["task_id"] for t in tasks}, launch,
                                  deadline_seconds=_deadline(session), position=sessions.positions(session)):
        log.info("session %s was ended before it started", session.id)
        return
    _send(session, tasks, initial)


def _task_id(session: TrainingSession, seq: int) -> str:
    # `<session>:<seq>:<uuid>`, as rounds name theirs: the collector and the monitor read the session
    # and the task's number from it.
    return f"{session.id}:{seq}:{uuid()}"


def _deadline(session: TrainingSession) -> int:
    settings_, limit = session.federated, settings().train_time_limit + 60
    if settings_["time_budget"]:
        return settings_["time_budget"] + limit
    # Even if only `min_peers` peers keep answering, one task at a time each.
    return math.ceil(settings_["max_updates"] / session.quorum) * limit


def _weights_key(session: TrainingSession, seq: int, peer: str) -> str:
    return f"{session_prefix(session)}/updates/{seq}/peers/{peer}.safetensors"


def _send(session: TrainingSession, tasks: list[dict[str, Any]], global_url: str) -> None:
    grant = storage().grant_read(global_url, grant_seconds())  # every task starts from the same object
    config = ModelConfig.from_dict(session.plan["model"])
    runs = {run.name: run for run in session.peers}
    with app.producer_or_acquire() as producer:
        for task in tasks:
            spec = federated.spec(session, runs[task["peer"]], task["seq"], grant,
                                  _weights_key(session, task["seq"], task["peer"]), False, config)
            spec.pop("peer")
            app.signature("peertrain.train", args=[spec], queue=protocol.task_queue(task["peer"]),
                          task_id=task["task_id"], expires=grant_seconds(),
                          argsrepr=f"(session {session.id}, update {task['seq']}, peer {task['peer']})",
                          kwargsrepr="{}").apply_async(producer=producer)


# --- a peer reported ----------------------------------------------------------------------------

def receive(session: TrainingSession, task_id: str, result: dict[str, Any]) -> None:
    """Buffer (or reject) the update of task `task_id`, fold if the buffer is full, hand the peer its next task.

    Safe to run again for the same task (a redelivered `update` whose first run died midway): the update
    moves once, and the peer gets one next task, however often this runs."""
    seq = int(task_id.split(":")[1])
    update = updates.of_task(session.id, seq)
    if update is None or update.task_id != task_id or update.peer != result["peer"]:
        log.warning("session %s: no task %s of peer %s; result dropped", session.id, task_id, result["peer"])
        return
    peer = update.peer
    if update.status == updates.LOST:
        return  # given up on meanwhile: its share of the budget went to another peer
    if update.status == updates.TRAINING:
        # Its weights are read and checked once, when they are folded (_fold).
        samples = session.plan["shard_rows"][peer]
        info = {"metrics": result["final"], "seconds": result["seconds"], "samples": samples}
        if result["stopped"]:
            settled = updates.settle(session.id, seq, updates.REJECTED, reason="it stopped before finishing", **info)
        else:
            settled = updates.settle(session.id, seq, updates.BUFFERED, **info)
        if settled:
            record_results(session, [result], sessions.RUNNING, samples={peer: samples})
    settle_buffer(session.id)
    sent = not updates.sent_after(session.id, peer, seq) and dispatch(session, peer)
    if not sent:
        settle_buffer(session.id)  # that was the last task out: the session may be done


def stalled(session_id: Any) -> bool:
    """Work waits while another holds the fold lease (it may have died with it: look again later)."""
    doc = TrainingSession._get_collection().find_one({"_id": session_id}, {"plan.folding": 1})
    return bool(doc and (doc.get("plan") or {}).get("folding")) and _waiting(session_id)


def _read(session: TrainingSession, seq: int, peer: str) -> dict[str, torch.Tensor] | str:
    """The weights of update `seq` where the coordinator's plan puts them, capped and checked; or why not."""
    config = ModelConfig.from_dict(session.plan["model"])
    try:
        url = storage().url(_weights_key(session, seq, peer))
        return state_from_bytes(storage().get_bytes(url, max_state_bytes(config)), config)
    except (WeightsError, ValueError, StorageError) as exc:  # as a round treats a peer's weights
        return str(exc)


def dispatch(session: TrainingSession, peer: str) -> bool:
    """Give `peer` its next task from the newest global weights, while the budget lasts and the peer is
    not given up on; True if sent. (`session` for its fixed facts: shards, settings, the runs' places.)"""
    now = utcnow()
    claimed = TrainingSession._get_collection().find_one_and_update(
        {"_id": session.id, "status": sessions.RUNNING, "plan.remaining": {"$gt": 0},
         "$or": [{"plan.stop_at": None}, {"plan.stop_at": {"$gt": now}}],
         "peers": {"$elemMatch": {"name": peer, "status": {"$ne": sessions.FAILED}}}},
        {"$inc": {"plan.remaining": -1, "plan.sent": 1}},
        projection={"plan.sent": 1, "plan.version": 1, "plan.global_url": 1}, return_document=ReturnDocument.AFTER)
    if claimed is None:
        return False
    plan = claimed["plan"]
    seq = plan["sent"] - 1
    task = {"seq": seq, "peer": peer, "task_id": _task_id(session, seq), "base_version": plan["version"]}
    updates.dispatched(session.id, [task])
    # Named on the peer's run before it is sent: the collector takes only the task a peer was given.
    sessions.record_runs(session.id, sessions.positions(session),
                         {peer: {"task_id": task["task_id"], "status": sessions.RUNNING}},
                         before={peer: sessions.RUNNING})
    _send(session, [task], plan["global_url"])
    return True


def lost(session: TrainingSession, peer: str, reason: str) -> None:
    """`peer` was given up on (and the session goes on): its task's share of the budget goes to the others."""
    if given_back := updates.lose_training(session.id, peer, reason):
        TrainingSession.objects(id=session.id).update_one(inc__plan__remaining=given_back)
        # Peers that answered their last task while the budget looked spent are idle: they take it.
        session.reload()
        busy = set(updates.Update.objects(session_id=session.id, status=updates.TRAINING).distinct("peer"))
        for run in session.peers:
            if run.status != sessions.FAILED and run.name not in busy and not dispatch(session, run.name):
                break
    settle_buffer(session.id)


# --- folding ------------------------------------------------------------------------------------

def settle_buffer(session_id: Any) -> None:
    """Fold while a full buffer waits, and, once every task is answered, the rest; then finish."""
    while True:
        if not _claim(session_id):
            return  # whoever holds the lease looks again when it lets go
        try:
            worked = _step(session_id)
        finally:
            TrainingSession._get_collection().update_one({"_id": session_id}, {"$set": {"plan.folding": None}})
        if not worked and not _waiting(session_id):
            return


def _claim(session_id: Any) -> bool:
    now = utcnow()
    return bool(TrainingSession._get_collection().update_one(
        {"_id": session_id, "status": sessions.RUNNING,
         "$or": [{"plan.folding": None}, {"plan.folding": {"$lt": now - timedelta(seconds=LEASE_SECONDS)}}]},
        {"$set": {"plan.folding": now}}).modified_count)


def _done(session: TrainingSession) -> bool:
    """No task is out, and none will be sent."""
    plan = session.plan
    spent = plan["remaining"] <= 0 or (plan["stop_at"] is not None and utcnow() >= plan["stop_at"])
    return spent and updates.count(session.id, updates.TRAINING) == 0


def _waiting(session_id: Any) -> bool:
    session = TrainingSession.objects(id=session_id).only("status", "plan", "federated").first()
    if session is None or session.status != sessions.RUNNING:
        return False
    pending = updates.count(session_id, updates.BUFFERED)
    return pending >= session.federated["buffer_size"] or _done(session)


def _step(session_id: Any) -> bool:
    """Under the lease: one fold, or the session's end; False if there was nothing to do."""
    session = TrainingSession.objects(id=session_id).first()
    if session is None or session.status != sessions.RUNNING:
        return False
    pending, done = updates.buffered(session.id), _done(session)
    size = session.federated["buffer_size"]
    if len(pending) >= size or (pending and done):
        _fold(session, pending if done else pending[:size])
        return True
    if done:
        _finish(session)
        return True
    return False


@lru_cache(maxsize=16)
def _global(url: str, config_json: str) -> dict[str, torch.Tensor]:
    # Global versions never change once written: each is read once per coordinator process.
    config = ModelConfig.from_dict(json.loads(config_json))
    return state_from_bytes(storage().get_bytes(url, max_state_bytes(config)), config)


def _version_url(session: TrainingSession, version: int) -> str:
    if version == 0:
        return session.plan["initial_url"]
    return storage().url(f"{session_prefix(session)}/versions/{version}.safetensors")


def _fold(session: TrainingSession, pending: list[updates.Update]) -> None:
    plan, settings_ = session.plan, session.federated
    config = ModelConfig.from_dict(plan["model"])
    key = _config_key(session)
    version = plan["version"]
    contributions, used, rejected = [], [], {}
    for update in pending:
        # Read here, once, and not when it arrived: until its grant expires a peer could replace it anyway.
        read = _read(session, update.seq, update.peer)
        if isinstance(read, str):
            log.warning("session %s: update %s of peer %s rejected: %s", session.id, update.seq, update.peer, read)
            updates.Update.objects(id=update.id, status=updates.BUFFERED).update_one(
                set__status=updates.REJECTED, set__reason=read)
            rejected[f"{update.peer}#{update.seq}"] = read
            continue
        contributions.append(Contribution(_global(_version_url(session, update.base_version), key), read,
                                          update.samples, version - update.base_version))
        used.append(update)
    if not contributions:
        return
    method = settings_["aggregation"]
    merged = fold(_global(plan["global_url"], key), contributions,
                  lambda states, samples: federated.combine(method, list(states), list(samples)))
    model = SimpleDNN(config)
    model.load_state_dict(merged)
    metrics = federated.evaluate_global(model, session)
    url = storage().put_bytes(f"{session_prefix(session)}/versions/{version + 1}.safetensors",
                              state_to_bytes(merged, {"version": version + 1}))
    folded = [{"seq": u.seq, "peer": u.peer, "staleness": c.staleness, "weight": round(c.weight, 4)}
              for u, c in zip(used, contributions, strict=True)]
    elapsed = (utcnow() - session.started_at).total_seconds() if session.started_at else None
    round_doc = Round(round=version, peers=[u.peer for u in used], rejected=rejected, outliers={}, updates=folded,
                      metrics={**metrics, "samples": sum(c.samples for c in contributions), "updates": len(used),
                               "mean_staleness": sum(c.staleness for c in contributions) / len(contributions),
                               "seconds": elapsed})
    if not TrainingSession.objects(id=session.id, status=sessions.RUNNING, plan__version=version).update_one(
            push__rounds=round_doc, set__plan__version=version + 1, set__plan__global_url=url):
        return  # it ended meanwhile
    for entry in folded:
        updates.folded(session.id, entry["seq"], version + 1, entry["staleness"], entry["weight"])
    events.record_round(session.id, round_doc)
    log.info("session %s: version %d from %d update(s), staleness %s", session.id, version + 1, len(used),
             [c.staleness for c in contributions])


def _finish(session: TrainingSession) -> None:
    if not session.rounds:
        lifecycle.end(session.id, sessions.FAILED, "no peer returned a usable update")
        return
    config = ModelConfig.from_dict(session.plan["model"])
    model = SimpleDNN(config)
    model.load_state_dict(_global(session.plan["global_url"], _config_key(session)))
    counts = {status: updates.count(session.id, status) for status in updates.STATUSES}
    federated.finish(session, model, config, session.rounds[-1].metrics,
                     extra={"schedule": ASYNC, "versions": session.plan["version"],
                            "updates": {k.lower(): v for k, v in counts.items() if v}})


def _config_key(session: TrainingSession) -> str:
    return json.dumps(session.plan["model"], sort_keys=True)
