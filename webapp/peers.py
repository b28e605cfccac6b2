"""The peers: which ones a user may train on, and enrolling, sharing, pausing and removing one's own machines.

A signed-in user enrols a machine with `POST /peers` (a one-time join token, an hour to use it); on the
machine, `peertrain peer join` exchanges it at `POST /join` for the peer's own broker login, the
same one `python -m tasks.registry add` issues. The user owns that peer: it serves only the owner's
sessions until the owner shares it with everyone (`PATCH /peers/<name>` `public`) or through a pool
(`/pools`), and the owner may pause, resume or remove it.
"""

from __future__ import annotations

import logging
import secrets
from datetime import timedelta
from typing import Any

from bson import ObjectId
from flask import current_app, request
from flask.views import MethodView
from flask_jwt_extended import current_user, jwt_required
from flask_smorest import abort
from mongoengine import NotUniqueError, Q

from models import Peer, Pool, TrainingSession, User
from models import peer as peers
from models import pool as pools
from models.db import utcnow
from models.peer import ONLINE, TRAINING
from settings import Settings
from tasks import enrolment, protocol
from webapp import outages
from webapp.extensions import Blueprint, dispatcher
from webapp.schemas import (
    EnrolmentSchema,
    EnrolSchema,
    JoinedSchema,
    JoinSchema,
    PeerDetailSchema,
    PeerListSchema,
    PeerPatchSchema,
    PoolListSchema,
    PoolPatchSchema,
    PoolSchema,
)

log = logging.getLogger(__name__)

blp = Blueprint("peers", __name__, url_prefix="/peers", description="Peer workers: the machines that train")
pools_blp = Blueprint("pools", __name__, url_prefix="/pools", description="Pools: sharing your peers with chosen users")
join_blp = Blueprint("join", __name__, url_prefix="/join", description="A machine joins with its one-time token")

SETTINGS = "peertrain.settings"
TOKEN_PREFIX = "ptj_"  # recognisable in logs and secret scanners, like GitHub's ghp_
SECURITY = [{"bearerAuth": []}]


def settings() -> Settings:
    return current_app.extensions[SETTINGS]


def visible() -> Q:
    """The peers a user sees: the public ones, their own, and those shared with them through pools."""
    return peers.public() | peers.owned_by(current_user.id) | pools.shared_with(current_user.id)


def _shown(found: list[Peer]) -> list[Peer]:
    """The peers with who owns them (and, for the owner, the pools that share them), as the schemas show them."""
    owners = {peer.owner_id for peer in found if peer.owner_id}
    names = {u.id: u.username for u in User.objects(id__in=list(owners)).only("username")} if owners else {}
    mine = [peer.name for peer in found if peer.owner_id == current_user.id]
    shared: dict[str, list[str]] = {}
    if mine:
        for pool in Pool.objects(owner_id=current_user.id, peers__in=mine).only("name", "peers"):
            for name in pool.peers:
                shared.setdefault(name, []).append(pool.name)
    for peer in found:
        peer.owner = names.get(peer.owner_id)
        peer.mine = peer.owner_id is not None and peer.owner_id == current_user.id
        peer.public = bool(peer.public) or peer.owner_id is None
        peer.pools = sorted(shared.get(peer.name, []))
    return found


def _own(name: str) -> Peer:
    """The signed-in user's peer `name`: 404 if they cannot see it, 403 if they see it but do not own it."""
    peer = Peer.objects(Q(name=name) & visible()).first()
    if peer is None:
        abort(404, message=f"no peer named {name!r} that you can see")
    if peer.owner_id != current_user.id:
        whose = "the platform's (an operator manages it)" if peer.owner_id is None else "another user's"
        abort(403, message=f"peer {name!r} is {whose}; only its owner may change or remove it")
    return peer


@blp.route("")
class Peers(MethodView):
    @jwt_required()
    @blp.etag
    @blp.response(200, PeerListSchema)
    @blp.doc(security=SECURITY)
    def get(self):
        """The peers you may train on or own, with status and record; `online` counts the reachable ones,
        `free` those idle (paused ones are not free)."""
        found = _shown(list(Peer.objects(visible()).order_by("name")))
        return {"peers": found, "online": sum(p.status in (ONLINE, TRAINING) for p in found),
                "free": sum(p.status == ONLINE and not p.paused for p in found), "total": len(found)}

    @jwt_required()
    @blp.arguments(EnrolSchema)
    @blp.response(201, EnrolmentSchema)
    @blp.alt_response(409, description="the name is another's, or the platform has no broker machines can join")
    @blp.doc(security=SECURITY)
    def post(self, body: dict[str, Any]):
        """Enrol a machine: a one-time join token (an hour to use it) and the command that joins and runs it.

        Enrolling a name of yours again gives a new token (the earlier one stops working)."""
        if settings().embedded_broker:
            abort(409, message="machines join a platform that runs with a broker: this one uses the in-process "
                               "broker of `make run`, which no other machine can reach. Start it with BROKER_URL "
                               "set to a RabbitMQ both can reach (`make run BROKER_URL=amqp://…`), then enrol again")
        name = body["name"]
        try:
            protocol.check_name(name)
        except ValueError as exc:
            abort(400, message=str(exc), errors={"name": [str(exc)]})
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        expires_at = utcnow() + timedelta(seconds=current_app.config["JOIN_TOKEN_SECONDS"])
        try:
            peers.enrol(name, current_user.id, token, expires_at)
        except NotUniqueError:
            abort(409, message=f"a peer named {name!r} exists and is not yours; choose another name",
                  errors={"name": ["taken"]})
        url = request.host_url.rstrip("/")  # where the user reached the platform, as dashboard links are
        log.info("peer %s enrolled by %s (token until %s)", name, current_user.username, expires_at)
        return {"name": name, "join_token": token, "expires_at": expires_at,
                "command": f"peertrain peer join --url {url} --token {token} && peertrain peer run"}


@join_blp.route("")
class Join(MethodView):
    @join_blp.arguments(JoinSchema)
    @join_blp.response(200, JoinedSchema)
    @join_blp.alt_response(401, description="the token is not one the platform issued (mistyped, tampered, replaced)")
    @join_blp.alt_response(410, description="the token was used already or has expired")
    @join_blp.alt_response(503, description="the broker did not answer; the token still works")
    def post(self, body: dict[str, Any]):
        """A machine exchanges its join token, once, for its peer's own broker login (no sign-in: the token is
        the credential)."""
        at = utcnow()
        peer, why = peers.redeem(body["token"], at)
        if peer is None:
            if why == "unknown":
                abort(401, message="this join token is not valid: it was mistyped, altered, or replaced by a newer "
                                   "one. Ask for a new one (POST /peers, or 'Add a machine' on the dashboard)")
            abort(410, message=f"this join token {'was used already' if why == 'used' else 'has expired'}; "
                               "tokens work once, within the hour. Ask for a new one (POST /peers with the same "
                               "name, or 'Add a machine' on the dashboard)")
        try:
            login = enrolment.issue_login(peer.name, settings())
        except Exception as exc:
            peers.unredeem(peer.name, at)
            if not outages.transient(exc):
                raise
            log.warning("peer %s could not join: the broker did not answer", peer.name, exc_info=True)
            abort(503, message="the broker did not answer; the token still works, try again",
                  headers={"Retry-After": "5"})
        log.info("peer %s joined", peer.name)
        return {"name": peer.name, "environment": login.environment, "command": login.command}


@blp.route("/<name>")
class PeerDetail(MethodView):
    @jwt_required()
    @blp.response(200, PeerDetailSchema)
    @blp.doc(security=SECURITY)
    def get(self, name: str):
        """One peer; its owner also sees the sessions it worked in and how its part in each ended."""
        peer = Peer.objects(Q(name=name) & visible()).first()
        if peer is None:
            abort(404, message=f"no peer named {name!r} that you can see")
        _shown([peer])
        peer.sessions = []
        if peer.mine:
            found = TrainingSession.objects(peers__name=name).only(
                "id", "status", "mode", "created_at", "finished_at", "peers").order_by("-created_at")[:50]
            for session in found:
                run = next((r for r in session.peers if r.name == name), None)
                session.outcome = run.status if run is not None else None
                peer.sessions.append(session)
        return peer

    @jwt_required()
    @blp.arguments(PeerPatchSchema)
    @blp.response(200, PeerDetailSchema)
    @blp.doc(security=SECURITY)
    def patch(self, body: dict[str, Any], name: str):
        """Share your peer with everyone (`public`), or pause it (`paused`: never claimed, still connected)."""
        _own(name)
        peer = peers.set_sharing(name, current_user.id, public=body.get("public"), paused=body.get("paused"))
        if peer is None:
            abort(404, message=f"peer {name!r} was removed meanwhile")
        log.info("peer %s: %s by its owner %s", name, body, current_user.username)
        _shown([peer])
        peer.sessions = []
        return peer

    @jwt_required()
    @blp.response(204)
    @blp.doc(security=SECURITY)
    def delete(self, name: str):
        """Remove your peer: its broker login is revoked at once, and a session it was training goes on without it
        as when a peer goes offline (or fails, if it cannot)."""
        _own(name)
        before = peers.unregister(name)
        enrolment.revoke(name, settings())
        Pool.objects(peers=name).update(pull__peers=name)
        if before is not None and before.status == TRAINING and before.session_id is not None:
            dispatcher().peer_lost(str(before.session_id), name, f"peer {name} was removed by its owner")
        log.info("peer %s removed by its owner %s", name, current_user.username)


# --- pools ---------------------------------------------------------------------------------------------------

def _users(usernames: list[str]) -> list[ObjectId]:
    found = {u.username: u.id for u in User.objects(username__in=usernames).only("username")}
    unknown = [name for name in usernames if name not in found]
    if unknown:
        abort(400, message=f"no user named {', '.join(map(repr, unknown))}", errors={"members": unknown})
    return [found[name] for name in usernames]


def _own_peers(names: list[str]) -> list[str]:
    found = set(Peer.objects(name__in=names, owner_id=current_user.id).scalar("name"))
    foreign = [name for name in names if name not in found]
    if foreign:
        abort(400, message=f"a pool shares only your own peers: {', '.join(map(repr, foreign))} "
                           f"{'is' if len(foreign) == 1 else 'are'} not yours", errors={"peers": foreign})
    return list(dict.fromkeys(names))


def _pool_view(pool: Pool) -> dict[str, Any]:
    ids = [pool.owner_id, *pool.members]
    names = {u.id: u.username for u in User.objects(id__in=ids).only("username")}
    return {"name": pool.name, "owner": names.get(pool.owner_id), "members": [names[m] for m in pool.members
                                                                                if m in names],
            "peers": list(pool.peers), "created_at": pool.created_at}


def _owned_pool(name: str) -> Pool:
    pool = pools.named(name)
    if pool is None or not pool.admits(current_user.id):
        abort(404, message=f"no pool named {name!r} that you own or belong to")
    if pool.owner_id != current_user.id:
        abort(403, message=f"only pool {name!r}'s owner may change it")
    return pool


@pools_blp.route("")
class Pools(MethodView):
    @jwt_required()
    @pools_blp.response(200, PoolListSchema)
    @pools_blp.doc(security=SECURITY)
    def get(self):
        """The pools you own or belong to: start a session on one with `pool=<name>`."""
        return {"pools": [_pool_view(pool) for pool in pools.visible_to(current_user.id)]}

    @jwt_required()
    @pools_blp.arguments(PoolSchema)
    @pools_blp.response(201, PoolSchema)
    @pools_blp.doc(security=SECURITY)
    def post(self, body: dict[str, Any]):
        """Share chosen peers of yours with chosen users (by username)."""
        pool = Pool(name=body["name"], owner_id=current_user.id, members=_users(body["members"]),
                    peers=_own_peers(body["peers"]))
        try:
            pool.save(force_insert=True)
        except NotUniqueError:
            abort(409, message=f"a pool named {body['name']!r} exists; choose another name",
                  errors={"name": ["taken"]})
        return _pool_view(pool)


@pools_blp.route("/<name>")
class PoolDetail(MethodView):
    @jwt_required()
    @pools_blp.arguments(PoolPatchSchema)
    @pools_blp.response(200, PoolSchema)
    @pools_blp.doc(security=SECURITY)
    def patch(self, body: dict[str, Any], name: str):
        """Replace your pool's members and/or peers."""
        pool = _owned_pool(name)
        fields = {}
        if "members" in body:
            fields["set__members"] = _users(body["members"])
        if "peers" in body:
            fields["set__peers"] = _own_peers(body["peers"])
        if fields:
            pool = Pool.objects(id=pool.id).modify(new=True, **fields)
        return _pool_view(pool)

    @jwt_required()
    @pools_blp.response(204)
    @pools_blp.doc(security=SECURITY)
    def delete(self, name: str):
        """Delete your pool (its peers stay yours; sessions running on them go on)."""
        Pool.objects(id=_owned_pool(name).id).delete()
