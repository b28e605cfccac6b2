"""Starting a session: validate the upload, claim peers, store the data, hand over to the coordinator.

Each step that takes something (peers, a stored object, a session document) is undone if a later
step fails, so a refused or failed start leaves nothing locked and nothing half-made.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from bson import ObjectId
from flask import current_app, has_request_context, request
from flask_smorest import abort
from mongoengine import Q
from werkzeug.datastructures import FileStorage

from models import Dataset, PeerRun, TrainingSession, User
from models import event as events
from models import peer as peers
from models import pool as pools
from models import session as sessions
from models.db import utcnow
from models.session import FAILED, FEDERATED, INTERRUPTED, PENDING, FederatedSettings, SearchState
from tasks.storage import HashingReader
from trainer.split import VALIDATION_FRACTION, shard
from trainer.table import DatasetError, Table, read_table, split_indices
from webapp import outages
from webapp.extensions import dispatcher, storage
from webapp.schemas import MAX_PEERS

log = logging.getLogger(__name__)



@dataclass
class Upload:
    """The uploaded CSV, spooled once to a local file while counting and hashing it."""

    path: Path
    filename: str
    bytes: int
    sha256: str


@contextmanager
def spooled(upload: FileStorage) -> Iterator[Upload]:
    """Copy the upload to a temporary file in chunks (removed afterwards), so it is never held in memory."""
    if not upload.filename:
        abort(400, message="the file part has no file name", errors={"file": ["missing file name"]})
    with tempfile.TemporaryDirectory(prefix="peertrain-upload-") as tmp:
        path = Path(tmp) / "dataset.csv"
        reader = HashingReader(upload.stream)
        with path.open("wb") as out:
            shutil.copyfileobj(reader, out, 1 << 20)
        yield Upload(path, upload.filename[-200:], reader.bytes, reader.sha256)


def inspect_upload(upload: Upload, form: dict[str, Any], split_seed: int) -> Table:
    """Read and validate the CSV with the trainer's own reader; a bad file is a 400 naming the problem."""
    try:
        table = read_table(upload.path, target=form["target"], features=form.get("features"), task=form["task"])
        train_rows, _ = split_indices(table.y, VALIDATION_FRACTION, seed=split_seed,
                                      stratify=table.classes is not None)
        if form["mode"] == FEDERATED:
            # The coordinator will shard the same way: refuse now what it could not do.
            shard(train_rows, table.y, form["num_peers"], form["partition"], alpha=form["alpha"], seed=split_seed)
    except DatasetError as exc:
        abort(400, message=f"the dataset cannot be used: {exc}", errors={"file": [str(exc)]})
    return table


def start(user: User, form: dict[str, Any], file: FileStorage) -> TrainingSession:
    """Claim peers and launch a session for `user`; aborts with 400 when it cannot."""
    with spooled(file) as upload:
        return _start(user, form, upload)


def _start(user: User, form: dict[str, Any], upload: Upload) -> TrainingSession:
    # Which rows are held out is the platform's secret: no peer learns this seed (its `seed` is the user's).
    split_seed = secrets.randbelow(2**31)
    among = pool_filter(user, form.get("pool") or "public")
    table = inspect_upload(upload, form, split_seed)
    wanted = form["num_peers"]
    session_id = ObjectId()
    stale_after = timedelta(seconds=current_app.config["PEER_TIMEOUT_SECONDS"])
    names = peers.claim(session_id, wanted, stale_after=stale_after, among=among)
    if not names:
        # The peers the claim could take: one not heard from within the silence limit may be gone.
        online = peers.online_count(stale_after, among=among)
        where = "" if form.get("pool", "public") == "public" else f" in pool {form['pool']!r}"
        abort(
            400,
            message=f"not enough peers: {wanted} requested, {online} online and free{where}",
            errors={"num_peers": [f"only {online} peer(s) online and free{where}"]},
        )
    saved = False
    try:
        with upload.path.open("rb") as stream:
            url = storage().put(f"users/{user.id}/sessions/{session_id}/dataset.csv", stream)
        session = _document(session_id, user, form, table, names, url, upload)
        session.split_seed = split_seed
        session.save()
        saved = True
        events.append(session_id, [events.status(PENDING, at=session.created_at)])
        dispatcher().run_session(str(session_id))
    except Exception as exc:
        # Whatever failed, nothing stays claimed and the session does not wait for a coordinator.
        peers.release(session_id)
        outage = outages.transient(exc)
        if saved:
            reason = ("could not reach the coordinator; start the session again" if outage
                      else "internal error while starting; it has been logged")
            sessions.finish(session_id, FAILED, reason)
        if not outage:
            raise  # a bug: the error handler logs it with its traceback and answers 500
        log.warning("starting session %s: a service did not answer", session_id, exc_info=True)
        abort(503, message="the platform could not start the session (a service it needs did not answer); "
                           "no peer was kept, try again", headers={"Retry-After": "5"})
    log.info("session %s started by %s: %s on %s; follow it at %s", session_id, user.username, form["mode"],
             ", ".join(names), dashboard_link(session_id))
    return session


def pool_filter(user: User, pool: str) -> Q:
    """The peers a session of `user`'s may claim in `pool`; aborts with 400 for a pool the user is not in."""
    among = pools.peers_for(user.id, pool)
    if among is None:
        # Not found and not a member read alike: a pool's existence is its members' business.
        abort(400, message=f"no pool named {pool!r} that you own or belong to",
              errors={"pool": ["`public`, `mine`, or the name of a pool you own or belong to (GET /pools)"]})
    return among


def dashboard_link(session_id: Any) -> str:
    """The session's page on the dashboard, at the address the request came to (an app context's: none)."""
    base = request.host_url if has_request_context() else current_app.config.get("PUBLIC_URL") or ""
    return f"{base.rstrip('/')}/#/sessions/{session_id}"


class Unresumable(Exception):
    """Why a session cannot be resumed now: the HTTP status, a message, and which fields are at fault."""

    def __init__(self, status: int, message: str, errors: dict[str, list[str]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.errors, self.headers = status, message, errors, headers


def resume(session: TrainingSession) -> None:
    """Resume an INTERRUPTED session on the peers it had (their shards and checkpoints are theirs); Unresumable
    (409) when it was not interrupted or one of them is not online and free, (503) when the coordinator cannot
    be reached. In an app context (its dispatcher sends the coordinator's task)."""
    if session.status != INTERRUPTED:
        raise Unresumable(409, f"only an INTERRUPTED session can be resumed; session {session.id} is {session.status}")
    names = [run.name for run in session.in_play()]
    stale_after = timedelta(seconds=current_app.config["PEER_TIMEOUT_SECONDS"])
    # Still within its pool: an owner who stopped sharing a peer meanwhile has taken it back.
    among = pools.peers_for(session.owner_id, session.pool or "public")
    if among is None:
        raise Unresumable(409, f"the session's pool {session.pool!r} is gone, or you are no longer in it",
                          {"pool": [session.pool]})
    missing = peers.claim_named(session.id, names, stale_after=stale_after, among=among)
    if missing:
        found = {p.name: p for p in peers.Peer.objects(name__in=missing).only("name", "status", "paused")}
        shared = {p.name for p in peers.Peer.objects(Q(name__in=missing) & among).only("name")}

        def why(name: str) -> str:
            if name not in found:
                return "not registered"
            if name not in shared:
                return "no longer shared with you"
            return "paused by its owner" if found[name].paused else found[name].status

        busy = ", ".join(f"{name} is {why(name)}" for name in missing)
        raise Unresumable(409, f"the session goes on with the peers it had, and they must be online and free: {busy};"
                               " try again when they are", {"peers": [busy]})
    if not sessions.resume(session.id, utcnow()):
        peers.release(session.id)
        raise Unresumable(409, f"session {session.id} is no longer INTERRUPTED (resumed by another request?)")
    try:
        dispatcher().run_session(str(session.id))
    except Exception as exc:
        peers.release(session.id)
        sessions.finish(session.id, INTERRUPTED, "could not reach the coordinator to resume it; try again")
        if not outages.transient(exc):
            raise
        log.warning("resuming session %s: a service did not answer", session.id, exc_info=True)
        raise Unresumable(503, "the platform could not resume the session (a service it needs did not answer); "
                               "it is still INTERRUPTED, try again", headers={"Retry-After": "5"}) from exc
    log.info("session %s resumed on %s; follow it at %s", session.id, ", ".join(names), dashboard_link(session.id))


def _document(session_id: ObjectId, user: User, form: dict[str, Any], table: Table, names: list[str],
              url: str, upload: Upload) -> TrainingSession:
    federated = None
    if form["mode"] == FEDERATED:
        chosen = ("rounds", "local_epochs", "partition", "alpha", "aggregation", "schedule", "buffer_size",
                  "max_updates", "time_budget", "algorithm", "mu", "server_lr")
        federated = FederatedSettings(**{key: form[key] for key in chosen if form.get(key) is not None})
    runs = [
        PeerRun(name=name, hyperparameters=hp, epochs=federated.epochs_per_peer() if federated else hp["epochs"])
        for name, hp in zip(names, form["hyperparameters"], strict=True)
    ]
    return TrainingSession(
        id=session_id,
        owner_id=user.id,
        mode=form["mode"],
        pool=form.get("pool") or "public",
        elastic=form.get("elastic", False),
        max_peers=(form.get("max_peers") or MAX_PEERS) if form.get("elastic") else None,
        task=form["task"],
        target=table.target,
        features=table.features,
        seed=form["seed"],
        min_peers=form.get("min_peers"),
        # None: the platform sets each task's deadline from how long its fellows took (models.assignment.tighten).
        round_timeout=form.get("round_timeout"),
        dataset=Dataset(
            filename=upload.filename,
            url=url,
            bytes=upload.bytes,
            sha256=upload.sha256,
            rows=table.rows,
            columns=len(table.columns),
            classes=table.classes,
        ),
        peers=runs,
        federated=federated,
        search=SearchState(**form["search"]) if form.get("search") else None,
    )
