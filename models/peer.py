"""Peers: the registered worker machines that train, their record, and the atomic claim that hands them to a session.

A peer exists here only once it is registered: by an operator (`python -m tasks.registry add NAME`, which
also issues its broker login; such a peer is the platform's), or by a signed-in user (`POST /peers`, which
gives a one-time join token the user's machine exchanges for its login; such a peer is that user's, serves
only its owner until it is shared publicly or through a pool, and can be paused: never claimed, still
connected). Whether it is there is the broker's say where the broker can say it: a peer is ONLINE
while its own login consumes its own queue (the monitor asks RabbitMQ, `consuming`); its events only
say how fresh it is and how its training goes. Its record (tasks accepted, rejected, outliers, timed out,
failed) follows it across sessions: claims prefer reputable peers, and one whose updates were rejected
in three sessions running is QUARANTINED, never claimed, until an operator restores it.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from bson import ObjectId
from mongoengine import BooleanField, DateTimeField, Document, IntField, ObjectIdField, Q, StringField

from models.db import utcnow

ONLINE = "ONLINE"
TRAINING = "TRAINING"
OFFLINE = "OFFLINE"
QUARANTINED = "QUARANTINED"
STATUSES = (ONLINE, TRAINING, OFFLINE, QUARANTINED)
# What a peer's record counts, task by task.
COUNTERS = ("accepted", "rejected", "outliers", "timed_out", "failed")
# Sessions running in which a peer's updates were rejected, after which it is quarantined.
STRIKES = 3


class Peer(Document):
    """One peer worker and its record."""

    name = StringField(required=True, unique=True)
    status = StringField(required=True, choices=STATUSES, default=OFFLINE)
    hostname = StringField()
    session_id = ObjectIdField()
    last_seen = DateTimeField()
    online_since = DateTimeField()
    registered_at = DateTimeField(default=utcnow)
    accepted = IntField(default=0)  # tasks whose result the coordinator used
    rejected = IntField(default=0)  # tasks whose update the coordinator refused (why: last_rejection)
    outliers = IntField(default=0)  # tasks whose update was far from the others'
    timed_out = IntField(default=0)  # tasks not finished by their deadline
    failed = IntField(default=0)  # tasks that failed on the peer
    strikes = IntField(default=0)  # sessions running in which some update of its was rejected
    last_rejection = StringField()
    quarantined_at = DateTimeField()
    owner_id = ObjectIdField()  # the user who enrolled it; None: the platform's (registered by an operator)
    public = BooleanField(default=False)  # an owned peer serves everyone's sessions (the platform's always do)
    paused = BooleanField(default=False)  # its owner keeps it out of claims; it stays connected
    # Enrolment: the SHA-256 of its one-time join token (kept after use, to say "used" rather than "unknown").
    join_token_hash = StringField()
    join_expires_at = DateTimeField()
    joined_at = DateTimeField()

    meta = {"collection": "peers", "strict": False,
            "indexes": ["status", "session_id", "owner_id", {"fields": ["join_token_hash"], "sparse": True}]}

    @property
    def reputation(self) -> float:
        return reputation(self.to_mongo())


def reputation(record: dict[str, Any]) -> float:
    """How far a peer's record lets it be trusted, 0..1: the share of its tasks that were used, counted as if
    it had one used and one refused beforehand (a newcomer is 0.5: neither starved nor favoured)."""
    good = record.get("accepted") or 0
    bad = sum(record.get(name) or 0 for name in ("rejected", "timed_out", "failed"))
    return (good + 1) / (good + bad + 2)


def register(name: str) -> Peer:
    """Add a peer, OFFLINE until its worker shows up; NotUniqueError if the name is taken."""
    peer = Peer(name=name, status=OFFLINE)
    peer.save(force_insert=True)
    return peer


def unregister(name: str) -> Peer | None:
    """Remove a peer; returns it as it was (None if it was not registered)."""
    return Peer.objects(name=name).modify(remove=True)


def names() -> list[str]:
    """Every registered peer's name."""
    # Raw documents: mongoengine's scalar() builds a Document per peer first (the monitor asks every second).
    return [doc["name"] for doc in Peer.objects.only("name").as_pymongo()]


def seen(name: str, hostname: str, at: datetime | None = None, online: bool = True) -> bool:
    """Record a sign of life of a registered peer (with `online`, an OFFLINE one becomes ONLINE: where nothing
    else can tell, as with `make run`'s in-process peers); False (nothing recorded) when it is not registered."""
    at = at or utcnow()
    if not Peer.objects(name=name).update_one(set__hostname=hostname, set__last_seen=at):
        return False
    if online:
        Peer.objects(name=name, status=OFFLINE).update_one(set__status=ONLINE, set__online_since=at)
    return True


def still_seen(names: list[str], at: datetime | None = None, online: bool = True) -> set[str]:
    """Record a sign of life of many peers at once (their hostnames unchanged); returns the registered ones.

    One read and two updates for any number of peers: the monitor's way with the worker heartbeats of
    peers it has already seen (each beats every 2 s), where one update per beat would not keep up."""
    if not names:
        return set()
    at = at or utcnow()
    known = {doc["name"] for doc in Peer.objects(name__in=names).only("name").as_pymongo()}
    if known:
        Peer.objects(name__in=list(known)).update(set__last_seen=at)
        if online:
            Peer.objects(name__in=list(known), status=OFFLINE).update(set__status=ONLINE, set__online_since=at)
    return known


def consuming(names: set[str], at: datetime, judge: bool = True) -> list[Peer]:
    """What the broker shows: peers `names` consume their own queue. OFFLINE ones among them become ONLINE;
    with `judge`, peers ONLINE or TRAINING that do not are OFFLINE. Returns those, as they were."""
    Peer.objects(name__in=list(names), status=OFFLINE).update(set__status=ONLINE, set__online_since=at)
    if not judge:
        return []
    away = list(Peer.objects(status__in=[ONLINE, TRAINING], name__nin=list(names)))
    for peer in away:
        Peer.objects(name=peer.name, status=peer.status).update_one(set__status=OFFLINE)
    return away


def gone(name: str, idle_only: bool = False) -> Peer | None:
    """Mark a peer OFFLINE (it fell silent; with `idle_only`, only if it is not training); returns it as it was."""
    query = (Peer.objects(name=name, status=ONLINE) if idle_only
             else Peer.objects(name=name, status__in=[ONLINE, TRAINING]))
    return query.modify(set__status=OFFLINE, new=False)


def silent_since(cutoff: datetime) -> list[str]:
    """Peers ONLINE or TRAINING whose last sign of life is older than `cutoff`, the longest silent first."""
    query = Peer.objects(status__in=[ONLINE, TRAINING], last_seen__lt=cutoff).order_by("last_seen")
    return [doc["name"] for doc in query.only("name").as_pymongo()]


def public() -> Q:
    """Peers anyone's session may claim: the platform's and those their owners shared publicly."""
    return Q(owner_id=None) | Q(public=True)


def owned_by(user_id: ObjectId) -> Q:
    return Q(owner_id=user_id)


def claimable(among: Q | None = None) -> Q:
    """ONLINE, not paused, and within `among` (a pool; default: the public peers)."""
    return Q(status=ONLINE) & Q(paused__ne=True) & (public() if among is None else among)


def online_count(stale_after: timedelta | None = None, among: Q | None = None) -> int:
    """Peers a claim could take: ONLINE (free), not paused, within `among` (default: public), and heard from
    within `stale_after` if given."""
    query = Peer.objects(claimable(among))
    if stale_after is not None:
        query = query.filter(last_seen__gte=utcnow() - stale_after)
    return query.count()


def claim(session_id: ObjectId, count: int, stale_after: timedelta | None = None,
          rng: random.Random | None = None, among: Q | None = None) -> list[str]:
    """Atomically move `count` ONLINE peers within `among` (a pool: `public()` by default, `owned_by(user)`, or
    a named pool's peers) to TRAINING for `session_id`; all of them or none. Paused peers are never taken.

    The most reputable first, equals in a random order (never by how fresh their events are: any peer can
    make its own look fresh). Each peer is taken with a conditional update (ONLINE → TRAINING), so two
    sessions claiming at once never share a peer; if fewer than `count` can be taken, the ones taken are
    given back.
    """
    if count < 1:
        return []
    query = Peer.objects(claimable(among))
    if stale_after is not None:
        query = query.filter(last_seen__gte=utcnow() - stale_after)
    rng = rng or random.Random()
    candidates = [(-reputation(record), rng.random(), record["name"])
                  for record in query.only("name", *COUNTERS).as_pymongo()]
    claimed: list[str] = []
    for _, _, name in sorted(candidates):
        # Conditioned again on not being paused: its owner may pause it between the read and this update.
        taken = Peer.objects(name=name, status=ONLINE, paused__ne=True).update_one(
            set__status=TRAINING, set__session_id=session_id)
        if taken:
            claimed.append(name)
            if len(claimed) == count:
                return claimed
    release(session_id, claimed)
    return []


def claim_up_to(session_id: ObjectId, count: int, among: Q, stale_after: timedelta | None = None,
                exclude: list[str] = ()) -> list[str]:
    """Move up to `count` ONLINE peers within `among` (not paused, not in `exclude`) to TRAINING for a running
    `session_id`, the most reputable first; returns those taken (a session growing takes what there is)."""
    if count < 1:
        return []
    query = Peer.objects(claimable(among) & Q(name__nin=list(exclude)))
    if stale_after is not None:
        query = query.filter(last_seen__gte=utcnow() - stale_after)
    candidates = sorted((-reputation(record), random.random(), record["name"])
                        for record in query.only("name", *COUNTERS).as_pymongo())
    taken: list[str] = []
    for _, _, name in candidates:
        if Peer.objects(name=name, status=ONLINE, paused__ne=True).update_one(
                set__status=TRAINING, set__session_id=session_id):
            taken.append(name)
            if len(taken) == count:
                break
    return taken


def claim_named(session_id: ObjectId, names: list[str], stale_after: timedelta | None = None,
                among: Q | None = None) -> list[str]:
    """Move the peers `names` (ONLINE, not paused, within `among` if given, and heard from within `stale_after`)
    to TRAINING for `session_id`, all of them or none; returns those that could not be taken (none: all were)."""
    taken: list[str] = []
    for name in names:
        query = Peer.objects(Q(name=name, status=ONLINE, paused__ne=True) & (among or Q()))
        if stale_after is not None:
            query = query.filter(last_seen__gte=utcnow() - stale_after)
        if query.update_one(set__status=TRAINING, set__session_id=session_id):
            taken.append(name)
    missing = [name for name in names if name not in taken]
    if missing:
        release(session_id, taken)
    return missing


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


# --- the record ----------------------------------------------------------------------------------------

def count(name: str, why: str | None = None, **counters: int) -> None:
    """Add to a peer's record (`accepted=1`, `rejected=1`, …); `why` a rejection's reason."""
    incs = {f"inc__{key}": value for key, value in counters.items() if key in COUNTERS and value}
    if why:
        incs["set__last_rejection"] = why[:300]
    if incs:
        Peer.objects(name=name).update_one(**incs)


def count_accepted(names: list[str]) -> None:
    """Each of `names` (a name once per update) had an update used: one update per distinct count, not per peer
    (a round at a thousand peers)."""
    by_count: dict[int, list[str]] = {}
    for name, times in Counter(names).items():
        by_count.setdefault(times, []).append(name)
    for times, group in by_count.items():
        Peer.objects(name__in=group).update(inc__accepted=times)


def strike(names: list[str], spared: list[str], at: datetime) -> list[str]:
    """After a session: peers `names` had updates rejected in it (a strike each), peers `spared` did not
    (their strikes start over). Returns the peers quarantined now (STRIKES sessions running)."""
    if spared:
        Peer.objects(name__in=spared).update(set__strikes=0)
    if not names:
        return []
    Peer.objects(name__in=names).update(inc__strikes=1)
    out = list(Peer.objects(name__in=names, strikes__gte=STRIKES, status__ne=QUARANTINED).scalar("name"))
    if out:
        Peer.objects(name__in=out).update(set__status=QUARANTINED, set__quarantined_at=at, unset__session_id=True)
    return out


def restore(name: str) -> bool:
    """An operator lets a quarantined peer work again (OFFLINE until it is seen, its strikes forgotten)."""
    return bool(Peer.objects(name=name, status=QUARANTINED).update_one(
        set__status=OFFLINE, set__strikes=0, unset__quarantined_at=True))


# --- owners and enrolment ---------------------------------------------------------------------------------

def token_hash(token: str) -> str:
    """How a join token is stored: its SHA-256 (the token is 256 random bits, so no salt or stretching is needed)."""
    return hashlib.sha256(token.encode()).hexdigest()


def enrol(name: str, owner_id: ObjectId, token: str, expires_at: datetime) -> Peer:
    """Register peer `name` for `owner_id` with a join token (OFFLINE until its machine joins and runs), or give
    the owner's existing peer `name` a new token (an earlier unused one stops working). NotUniqueError when
    the name belongs to another owner or to the platform."""
    fields = {"set__join_token_hash": token_hash(token), "set__join_expires_at": expires_at,
              "unset__joined_at": True}
    if Peer.objects(name=name, owner_id=owner_id).update_one(**fields):
        return Peer.objects.get(name=name)
    peer = Peer(name=name, status=OFFLINE, owner_id=owner_id, join_token_hash=token_hash(token),
                join_expires_at=expires_at)
    peer.save(force_insert=True)
    return peer


def redeem(token: str, at: datetime) -> tuple[Peer | None, str | None]:
    """Use a join token once: (the peer it enrols, None), or (None, why not: "unknown", "used", "expired").

    One conditional update takes it, so two machines presenting the same token never both get a login."""
    digest = token_hash(token)
    peer = Peer.objects(join_token_hash=digest, joined_at=None, join_expires_at__gt=at).modify(
        set__joined_at=at, new=True)
    if peer is not None:
        return peer, None
    known = Peer.objects(join_token_hash=digest).only("joined_at").first()
    if known is None:
        return None, "unknown"
    return None, "used" if known.joined_at is not None else "expired"


def unredeem(name: str, at: datetime) -> None:
    """Give a token back after its login could not be issued (the broker did not answer): it may be tried again."""
    Peer.objects(name=name, joined_at=at).update_one(unset__joined_at=True)


def set_sharing(name: str, owner_id: ObjectId, public: bool | None = None, paused: bool | None = None) -> Peer | None:
    """The owner shares (or stops sharing) a peer publicly, pauses or resumes it; None if not its owner's."""
    fields = {}
    if public is not None:
        fields["set__public"] = public
    if paused is not None:
        fields["set__paused"] = paused
    query = Peer.objects(name=name, owner_id=owner_id)
    return query.modify(new=True, **fields) if fields else query.first()
