"""Training sessions: start one, follow it, read its heartbeats and rounds, download its model."""

from __future__ import annotations

from flask import Response, current_app, request, stream_with_context
from flask.views import MethodView
from flask_jwt_extended import current_user, jwt_required
from flask_smorest import abort

from models import Heartbeat, TrainingSession
from models import session as sessions
from models import trial as trials
from models import update as updates
from webapp import launch, stream
from webapp.extensions import Blueprint, dispatcher, storage
from webapp.schemas import (
    HeartbeatPageSchema,
    HeartbeatQuerySchema,
    ModelQuerySchema,
    RoundListSchema,
    SessionListSchema,
    SessionSchema,
    StartedSchema,
    StartSessionSchema,
    TrainingStatusSchema,
    TrialListSchema,
    UpdateListSchema,
)

blp = Blueprint("sessions", __name__, url_prefix="/sessions", description="Training sessions")
AUTH = [{"bearerAuth": []}]


def _links(status: int, session_id: str) -> dict:
    """OpenAPI links from an answer naming a session (at runtime expression `session_id`) to its routes."""
    routes = {"session": ("", "get"), "heartbeats": ("/heartbeats", "get"), "rounds": ("/rounds", "get"),
              "updates": ("/updates", "get"), "trials": ("/trials", "get"), "model": ("/model", "get"),
              "cancel": ("/cancel", "post"), "resume": ("/resume", "post")}
    links = {name: {"operationRef": f"#/paths/~1sessions~1{{session_id}}{suffix.replace('/', '~1')}/{method}",
                    "parameters": {"session_id": session_id}}
             for name, (suffix, method) in routes.items()}
    return {"responses": {status: {"links": links}}}


def _owned(session_id: str, load=sessions.get_owned) -> TrainingSession:
    """The caller's session (as `load` reads it), or 404: another user's session does not exist for them."""
    session = load(_resolved(session_id), current_user.id)
    if session is None:
        abort(404, message=f"no session {session_id}")
    return session


def _resolved(session_id: str) -> str:
    """The id of the caller's session that `session_id` is, or begins (the dashboard shows 8 characters): 404
    when none of theirs does, 400 when more than one does."""
    if len(session_id) == 24:
        return session_id
    found = sessions.starting_with(session_id, current_user.id)
    if not found:
        abort(404, message=f"no session {session_id}")
    if len(found) > 1:
        why = f"more than one of your sessions begins with {session_id}"
        abort(400, message=f"{why}: give more of its id", errors={"session_id": [why]})
    return str(found[0])


SHORT = "`session_id` is shorter than an id and more than one of the caller's sessions begins with it"


@blp.route("/start")
class Start(MethodView):
    @jwt_required()
    @blp.arguments(StartSessionSchema, location="multipart")
    @blp.response(202, StartedSchema)
    @blp.alt_response(404, description="the token's user no longer exists")
    @blp.alt_response(413, description="the upload is over the size cap")
    @blp.doc(security=AUTH, **_links(202, "$response.body#/session_id"))
    def post(self, form: dict):
        """Start a training session on the uploaded CSV with `num_peers` peers."""
        session = launch.start(current_user, form, form["file"])
        peers = [p.name for p in session.peers]
        return {"session_id": str(session.id), "status": session.status, "assigned_peers": peers}


@blp.route("")
class Sessions(MethodView):
    @jwt_required()
    @blp.etag
    @blp.response(200, SessionListSchema)
    @blp.doc(security=AUTH, **_links(200, "$response.body#/items/0/id"))
    def get(self):
        """The caller's sessions, newest first."""
        items = list(sessions.for_owner(current_user.id))
        return {"items": items, "total": len(items)}


@blp.route("/training-status")
class TrainingStatus(MethodView):
    @jwt_required()
    @blp.etag
    @blp.response(200, TrainingStatusSchema)
    @blp.doc(security=AUTH, **_links(200, "$response.body#/session_id"))
    def get(self):
        """The status of the caller's most recent session."""
        session = sessions.for_owner(current_user.id).only("id", "status", "reason").first()
        if session is None:
            abort(404, message="you have no sessions yet")
        return {"session_id": str(session.id), "status": session.status, "reason": session.reason}


@blp.route("/<objectid:session_id>")
class Session(MethodView):
    @jwt_required()
    @blp.alt_response(400, description=SHORT)
    @blp.etag
    @blp.response(200, SessionSchema)
    @blp.doc(security=AUTH)
    def get(self, session_id: str):
        """One session: status, dataset, each peer's settings and progress, results."""
        return _owned(session_id, sessions.view)


@blp.route("/<objectid:session_id>/cancel")
class Cancel(MethodView):
    @jwt_required()
    @blp.alt_response(400, description=SHORT)
    @blp.response(202, TrainingStatusSchema)
    @blp.alt_response(409, description="the session has already ended")
    @blp.doc(security=AUTH)
    def post(self, session_id: str):
        """Stop a pending or running session; its peers are released."""
        session = _owned(session_id)
        if session.finished:
            abort(409, message=f"the session has already ended ({session.status})")
        dispatcher().cancel_session(str(session.id))
        return {"session_id": str(session.id), "status": session.status, "reason": "cancellation requested"}


@blp.route("/<objectid:session_id>/resume")
class Resume(MethodView):
    @jwt_required()
    @blp.alt_response(400, description=SHORT)
    @blp.response(202, TrainingStatusSchema)
    @blp.alt_response(409, description="the session was not interrupted, or its peers are not online and free")
    @blp.alt_response(503, description="the coordinator could not be reached; the session is still INTERRUPTED")
    @blp.doc(security=AUTH)
    def post(self, session_id: str):
        """Go on with an INTERRUPTED session (the platform stopped or crashed under it) on the peers it had:
        federated rounds already done are kept, sweep peers go on from their last checkpointed epoch."""
        session = _owned(session_id)
        try:
            launch.resume(session)
        except launch.Unresumable as exc:
            extra = {key: value for key, value in (("errors", exc.errors), ("headers", exc.headers)) if value}
            abort(exc.status, message=exc.message, **extra)
        return {"session_id": str(session.id), "status": sessions.PENDING, "reason": "resumed"}


LAST_EVENT_ID = {"name": "Last-Event-ID", "in": "header", "schema": {"type": "integer", "minimum": 0},
                 "description": "resume after this event id (what the client last received)"}


@blp.route("/<objectid:session_id>/events")
class Events(MethodView):
    @jwt_required()
    @blp.alt_response(400, description=SHORT)
    @blp.response(200, {"type": "object", "properties": {"id": {"type": "string"},
                                                         "event": {"type": "string",
                                                                   "enum": ["status", "heartbeat", "round", "peer",
                                                                            "end"]},
                                                         "data": {"type": "string"}}},
                  content_type=stream.MIMETYPE,
                  description="Server-Sent Events: status, heartbeat, round, peer, then end (see docs/api.md)")
    @blp.doc(security=AUTH, parameters=[LAST_EVENT_ID])
    def get(self, session_id: str):
        """The session's events from its start (or after Last-Event-ID), then live until it ends."""
        session = _owned(session_id)
        try:
            last = stream.parse_last_event_id(request.headers.get("Last-Event-ID"))
        except ValueError:
            abort(400, message="Last-Event-ID must be an event id (a non-negative integer)",
                  errors={"Last-Event-ID": ["not a non-negative integer"]})
        if request.method == "HEAD":
            # What webapp/asgi.py asks before it streams this request itself (no thread held while open), and
            # which session it is (the path may name it by the beginning of its id).
            return Response(status=200, mimetype=stream.MIMETYPE,
                            headers={**stream.HEADERS, stream.SESSION_HEADER: str(session.id)})
        frames = stream.frames(stream.hub(current_app.extensions), stream.Cursor(session.id, last))
        return Response(frames, mimetype=stream.MIMETYPE, headers=stream.HEADERS)


@blp.route("/<objectid:session_id>/heartbeats")
class Heartbeats(MethodView):
    @jwt_required()
    @blp.alt_response(400, description=SHORT)
    @blp.etag
    @blp.arguments(HeartbeatQuerySchema, location="query")
    @blp.response(200, HeartbeatPageSchema)
    @blp.doc(security=AUTH)
    def get(self, query: dict, session_id: str):
        """The per-epoch heartbeats persisted for a session, oldest first; filter by `peer` and `round`."""
        session = _owned(session_id)
        filters = {"session_id": session.id}
        for key in ("peer", "round"):
            if key in query:
                filters[key] = query[key]
        found = Heartbeat.objects(**filters).order_by("round", "epoch", "peer")
        page, size = query["page"], query["page_size"]
        return {
            "items": list(found.skip((page - 1) * size).limit(size)),
            "total": found.count(),
            "page": page,
            "page_size": size,
        }


@blp.route("/<objectid:session_id>/rounds")
class Rounds(MethodView):
    @jwt_required()
    @blp.alt_response(400, description=SHORT)
    @blp.etag
    @blp.response(200, RoundListSchema)
    @blp.doc(security=AUTH)
    def get(self, session_id: str):
        """A federated session's rounds with the global model's metrics after each."""
        return {"items": _owned(session_id).rounds}


@blp.route("/<objectid:session_id>/updates")
class Updates(MethodView):
    @jwt_required()
    @blp.alt_response(400, description=SHORT)
    @blp.etag
    @blp.response(200, UpdateListSchema)
    @blp.doc(security=AUTH)
    def get(self, session_id: str):
        """An asynchronous session's updates, one per task handed out, in order: what each peer trained
        from, and whether (with which staleness and weight) it was folded into the global model."""
        return {"items": list(updates.for_session(_owned(session_id).id))}


@blp.route("/<objectid:session_id>/trials")
class Trials(MethodView):
    @jwt_required()
    @blp.alt_response(400, description=SHORT)
    @blp.etag
    @blp.response(200, TrialListSchema)
    @blp.doc(security=AUTH)
    def get(self, session_id: str):
        """A searching sweep's trials, by number: the settings each tried, how it ended (COMPLETED, PRUNED,
        FAILED; WAITING or RUNNING while it lasts), its scores on the held-out rows and its curve; and the best."""
        session = _owned(session_id)
        found = trials.of_session(session.id)
        ranked = [t for t in found if t.get("value") is not None]
        return {"items": found, "best": min(ranked, key=trials.rank) if ranked else None,
                "metric": "val_accuracy" if session.task == "classification" else "val_r2", "tie_breaker": "val_loss"}


@blp.route("/<objectid:session_id>/model")
class Model(MethodView):
    @jwt_required()
    @blp.alt_response(400, description=SHORT)
    @blp.arguments(ModelQuerySchema, location="query")
    @blp.response(200, description="the trained model, a safetensors file", content_type="application/octet-stream")
    @blp.alt_response(404, description="the session has no such round")
    @blp.alt_response(409, description="the session has no model yet")
    @blp.doc(security=AUTH)
    def get(self, query: dict, session_id: str):
        """Download the final model (federated: the global model; sweep: the best peer's), or with `round` a
        federated session's global model after that round, whatever became of the session."""
        session = _owned(session_id)
        number = query.get("round")
        if number is not None:
            found = next((r for r in session.rounds if r.round == number), None)
            if found is None:
                abort(404, message=f"session {session_id} has no round {number} (it has {len(session.rounds)})")
            url, name = found.model_url, f"peertrain-{session.id}-round-{number}.safetensors"
        else:
            kept = [r.model_url for r in session.rounds if r.model_url]
            url, name = session.model_url or (kept[-1] if kept else None), f"peertrain-{session.id}.safetensors"
        if not url:
            abort(409, message=f"session {session_id} has no model ({session.status})")
        return Response(stream_with_context(storage().iter_chunks(url)), mimetype="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})
