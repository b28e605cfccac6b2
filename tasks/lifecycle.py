"""How a session ends, whoever ends it: the coordinator, a failing peer, the monitor or the user.

Ending is one conditional update (active → final), so when several of them race (a peer fails
while the user cancels) exactly one wins and the others do nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime, timedelta

from bson import ObjectId
from celery import Celery

from models import TrainingSession, utcnow
from models import assignment as assignments
from models import peer as peers
from models import pool as pools
from models import session as sessions
from models import trial as trials
from models import update as updates
from tasks import gate, protocol

log = logging.getLogger(__name__)


def request_stop(app: Celery, session_id: str, names: Iterable[str], reason: str, attempt: int = 0) -> None:
    """Tell each peer, on its own stop queue, that `session_id` is over: it stops between batches.

    A notice reaches a peer that is training for the session within a second, and a task of the
    session still queued behind it ends as soon as it starts.
    """
    notice = protocol.stop_notice(session_id, reason, attempt)
    with app.producer_or_acquire() as producer:
        for name in names:
            queue = protocol.stop_queue(name, declare=True)
            producer.publish(notice, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue],
                             serializer="json", delivery_mode=2, retry=True)


def end(app: Celery, session_id: str | ObjectId, status: str, reason: str | None = None,
        at: datetime | None = None, **fields) -> bool:
    """Finish an active session with `status`, stop its peers' work and release them; False if it had ended.

    The side effects come before the status changes, so whoever sees the session ended also sees its
    peers free; its runs still active end in the same update as the session. The side effects are idempotent:
    when two enders race, both apply them and one status wins.
    """
    session_id = ObjectId(session_id)
    session = TrainingSession.objects(id=session_id, status__in=sessions.ACTIVE).only("peers", "resumes").first()
    if session is None:
        return False
    why = f"the session ended {status}" + (f": {reason}" if reason else "")
    at = at or utcnow()
    if status != sessions.COMPLETED:
        request_stop(app, str(session_id), [run.name for run in session.peers], reason or status,
                     session.resumes or 0)
        # An asynchronous session's tasks still out will not be folded (resumed, it sends them again).
        lost = updates.give_up_all(session_id, why)
        if status == sessions.INTERRUPTED:
            sessions.give_back(session_id, lost)
        else:  # a search's open trials end with it (interrupted, they go on when it is resumed)
            trials.end_open(session_id, trials.PRUNED, at, why)
    # Whatever is still out is decided: a late result or heartbeat of it counts for nothing.
    assignments.close(session_id, gate.closed(why), at)
    released = peers.release(session_id)
    # The culprit of a failure was recorded already; the runs still active were stopped, not failed.
    runs_to = None if status == sessions.COMPLETED else (
        sessions.INTERRUPTED if status == sessions.INTERRUPTED else sessions.CANCELLED)
    if not sessions.finish(session_id, status, reason, runs_to=runs_to, **fields):
        return False
    if status != sessions.INTERRUPTED:  # it goes on when resumed: its peers are judged when it ends
        _strike(session.peers, at)
    log.info("session %s %s (%s); %d peer(s) released", session_id, status, reason or "-", released)
    return True


def _strike(runs: list[sessions.PeerRun], at: datetime) -> None:
    """A strike for each peer most of whose updates were refused in the session; three sessions running and it
    is QUARANTINED. One most of whose updates were used starts again from none."""
    struck = [run.name for run in runs if run.rejected and run.rejected >= run.accepted]
    spared = [run.name for run in runs if run.accepted > run.rejected]
    for name in peers.strike(struck, spared, at):
        log.warning("peer %s is QUARANTINED: its updates were refused in %d sessions running", name, peers.STRIKES)


def recruit(app: Celery, stale_after: timedelta | None = None) -> dict[str, list[str]]:
    """Hand free peers to running elastic sessions with room for them, the oldest session first, each within
    its pool (never a peer its owner did not share with the session's owner), and tell the coordinator
    (`peertrain.recruit`), which gives them work; returns session id -> the peers handed to it."""
    wanting = sessions.wanting_peers()
    if not wanting:
        return {}
    handed: dict[str, list[str]] = {}
    for doc in wanting:
        among = pools.peers_for(doc["owner_id"], doc.get("pool") or "public")
        if among is None:
            continue  # its pool was deleted: it goes on with the peers it has
        have = [run["name"] for run in doc.get("peers") or []]
        # Claimed for it by an earlier look whose word never reached the coordinator (this process died between
        # the claim and the send): told again, with any new ones (the coordinator adds each peer once).
        told_of = list(peers.Peer.objects(status=peers.TRAINING, session_id=doc["_id"], name__nin=have)
                       .scalar("name"))
        room = doc["max_peers"] - len(have) - len(told_of)
        names = told_of + peers.claim_up_to(doc["_id"], room, among, stale_after, exclude=have + told_of)
        if not names:
            continue
        try:
            app.send_task("peertrain.recruit", args=[str(doc["_id"]), names])
        except Exception:
            peers.release(doc["_id"], names)  # the coordinator will not hear of them: free them again now
            raise
        handed[str(doc["_id"])] = names
        log.info("session %s takes peer(s) %s, which came online", doc["_id"], ", ".join(names))
    return handed
