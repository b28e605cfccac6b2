"""Peers: the registered worker machines that train, and the atomic claim that hands them to one session.

A peer exists here only once it is registered (`python -m tasks.registry add NAME`, which also issues
its broker login); the monitor marks registered peers ONLINE or OFFLINE, and never adds one.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from bson import ObjectId
from mongoengine import DateTimeField, Document, ObjectIdField, StringField

from models.db import utcnow

ONLINE = "ONLINE"
TRAINING = "TRAINING"
OFFLINE = "OFFLINE"
STATUSES = (ONLINE, TRAINING, OFFLINE)


class Peer(Document):
    """One peer worker, known from the events its Celery worker sends."""

    name = StringField(required=True, unique=True)
    status = StringField(required=True, choices=STATUSES, default=OFFLINE)
    hostname = StringField()
    session_id = ObjectIdField()
    last_seen = DateTimeField()
    online_since = DateTimeField()
    registered_at = DateTimeField(default=utcnow)

    meta = {"collection": "peers", "indexes": ["status", "session_id"]}


def register(name: str) -> Peer:
    """Add a peer, OFFLINE until its worker shows up; NotUniqueError if the name is taken."""
    peer = Peer(name=name, status=OFFLINE)
    peer.save(force_insert=True)
    return peer


def unregister(name: str) -> Peer | None:
    """Remove a peer; returns it as it was (None if it was not registered)."""
    return Peer.objects(name=name).modify(remove=True)


def seen(name: str, hostname: str, at: datetime | None = None) -> bool:
    """Record a sign of life of a registered peer; an OFFLINE one becomes ONLINE, a TRAINING one stays so.

    False (and nothing recorded) when no such peer is registered."""
    at = at or utcnow()
    if not Peer.objects(name=name).update_one(set__hostname=hostname, set__last_seen=at):
        return False
    Peer.objects(name=name, status=OFFLINE).update_one(set__status=ONLINE, set__online_since=at)
    return True


def still_seen(names: list[str], at: datetime | None = None) -> set[str]:
    """Record a sign of life of many peers at once (their hostnames unchanged); returns the registered ones.

    One read and two updates for any number of peers: the monitor's way with the worker heartbeats of
    peers it has already seen (each beats every 2 s), where one update per beat would not keep up."""
    if not names:
        return set()
    at = at or utcnow()
    known = set(Peer.objects(name__in=names).scalar("name"))
    if known:
        Peer.objects(name__in=list(known)).update(set__last_seen=at)
        Peer.objects(name__in=list(known), status=OFFLINE).update(set__status=ONLINE, set__online_since=at)
    return known


def gone(name: str, idle_only: bool = False) -> Peer | None:
    """Mark a peer OFFLINE (it fell silent; with `idle_only`, only if it is not training); returns it as it was."""
    query = Peer.objects(name=name, status=ONLINE) if idle_only else Peer.objects(name=name, status__ne=OFFLINE)
    return query.modify(set__status=OFFLINE, new=False)


def silent_since(cutoff: datetime) -> list[Peer]:
    """Peers not OFFLINE whose last sign of life is older than `cutoff`."""
    return list(Peer.objects(status__ne=OFFLINE, last_seen__lt=cutoff))


def online_count() -> int:
    return Peer.objects(status=ONLINE).count()


def claim(session_id: ObjectId, count: int, stale_after: timedelta | None = None) -> list[str]:
    """Atomically move `count` ONLINE peers to TRAINING for `session_id`; all of them or none.

    Each peer is taken with a conditional update (ONLINE → TRAINING), so two sessions claiming at
    once never share a peer; if fewer than `count` can be taken, the ones taken are given back.
    """
    if count < 1:
        return []
    query = Peer.objects(status=ONLINE)
    if stale_after is not None:
        query = query.filter(last_seen__gte=utcnow() - stale_after)
    claimed: list[str] = []
    # Freshest first: a peer that beat recently is the likeliest to be there when its task arrives.
    for name in query.order_by("-last_seen").scalar("name"):
        taken = Peer.objects(name=name, status=ONLINE).update_one(set__status=TRAINING, set__session_id=session_id)
        if taken:
            claimed.append(name)
            if len(claimed) == count:
                return claimed
    release(session_id, claimed)
    return []


def release_orphans(active: list[ObjectId]) -> int:
    """Give back peers TRAINING for a session that is not among `active` (it ended while no one could)."""
    return Peer.objects(status=TRAINING, session_id__nin=active).update(set__status=ONLINE, unset__session_id=True)


def release(session_id: ObjectId, names: list[str] | None = None) -> int:
    """Give a session's peers back (TRAINING → ONLINE); peers that went OFFLINE meanwhile stay so."""
    query = Peer.objects(session_id=session_id)
    if names is not None:
        query = query.filter(name__in=names)
    released = query.filter(status=TRAINING).update(set__status=ONLINE, unset__session_id=True)
    query.update(unset__session_id=True)
    return released
