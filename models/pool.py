"""Pools: a user's named group of chosen users, with whom the user shares chosen peers of theirs.

A peer a user enrols serves only its owner until it is shared: with everyone (`Peer.public`) or through a
pool. A session started with `pool=<name>` claims only that pool's peers, and only the pool's owner and
members may start one.
"""

from __future__ import annotations

from bson import ObjectId
from mongoengine import DateTimeField, Document, ListField, ObjectIdField, Q, StringField

from models import peer as peers
from models.db import utcnow

# A pool's name is chosen by its owner; `public` and `mine` are what `pool` means without one.
RESERVED = ("public", "mine")


class Pool(Document):
    name = StringField(required=True, unique=True, min_length=1, max_length=64, regex=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    owner_id = ObjectIdField(required=True)
    members = ListField(ObjectIdField())  # users who may train on its peers (the owner always may)
    peers = ListField(StringField())  # the owner's peers it shares
    created_at = DateTimeField(default=utcnow)

    meta = {"collection": "pools", "indexes": ["owner_id", "members"], "strict": False}

    def admits(self, user_id: ObjectId) -> bool:
        return user_id == self.owner_id or user_id in self.members

    def peer_filter(self) -> Q:
        """The peers a session in this pool may claim: those listed that still belong to its owner."""
        return Q(name__in=list(self.peers)) & Q(owner_id=self.owner_id)


def visible_to(user_id: ObjectId) -> list[Pool]:
    """The pools a user owns or is a member of, by name."""
    return list(Pool.objects(Q(owner_id=user_id) | Q(members=user_id)).order_by("name"))


def named(name: str) -> Pool | None:
    return Pool.objects(name=name).first()


def shared_with(user_id: ObjectId) -> Q:
    """Peers shared with a user through pools the user belongs to (not the user's own)."""
    pools = Pool.objects(members=user_id).only("peers", "owner_id")
    query = Q(name__in=[])
    for pool in pools:
        query = query | pool.peer_filter()
    return query


def peers_for(user_id: ObjectId, pool: str) -> Q | None:
    """The peers a session of `user_id`'s may claim in `pool` (`public`, `mine`, or a pool's name); None when
    the user owns or belongs to no such pool."""
    if pool == "public":
        return peers.public()
    if pool == "mine":
        return peers.owned_by(user_id)
    found = named(pool)
    if found is None or not found.admits(user_id):
        return None
    return found.peer_filter()
