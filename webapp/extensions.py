"""The API's collaborators, attached to the app in `init_app` and reached through `current_app`."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import flask_smorest
from flask import Flask, current_app
from flask_jwt_extended import JWTManager
from flask_smorest import abort
from webargs.flaskparser import FlaskParser
from werkzeug.datastructures import CombinedMultiDict
from werkzeug.routing import BaseConverter

from tasks.storage import LocalGrants, Storage, open_storage
from webapp.passwords import Passwords


class Parser(FlaskParser):
    # A request that breaks the schema is a client error, 400, in the one error shape.
    DEFAULT_VALIDATION_STATUS = 400
    # "multipart": a form's fields and files validated by one schema, so the OpenAPI document
    # shows one multipart request body holding both.
    __location_map__ = {**FlaskParser.__location_map__, "multipart": "load_multipart"}

    def load_multipart(self, req: Any, schema: Any) -> Any:
        return self._makeproxy(CombinedMultiDict([req.form, req.files]), schema)

    def load_json(self, req: Any, schema: Any) -> Any:
        # A form-encoded body would otherwise read as every field missing.
        if not req.is_json:
            abort(400, message="send JSON: a JSON object body with the header Content-Type: application/json "
                               "(curl: -H 'Content-Type: application/json' -d '{...}')")
        return super().load_json(req, schema)


class ObjectIdConverter(BaseConverter):
    """A path segment that can be a database id (24 hex digits) or its first 6 or more (what the dashboard and
    the CLI show), so `/sessions/start` is never one."""

    regex = "[0-9a-fA-F]{6,24}"

    def to_python(self, value: str) -> str:
        return value.lower()


class Blueprint(flask_smorest.Blueprint):
    ARGUMENTS_PARSER = Parser()
    DEFAULT_LOCATION_CONTENT_TYPE_MAPPING = {
        **flask_smorest.Blueprint.DEFAULT_LOCATION_CONTENT_TYPE_MAPPING,
        "multipart": "multipart/form-data",
    }


jwt = JWTManager()

STORAGE = "peertrain.storage"
CELERY = "peertrain.celery"
DISPATCHER = "peertrain.dispatcher"
PASSWORDS = "peertrain.passwords"


class Dispatcher:
    """Sends work to the coordinator by task name, so the API never imports task code (or torch)."""

    def __init__(self, celery_app: Any, queue: str) -> None:
        self.celery = celery_app
        self.queue = queue

    def run_session(self, session_id: str) -> None:
        self.celery.send_task("peertrain.run_session", args=[session_id], queue=self.queue)

    def cancel_session(self, session_id: str) -> None:
        self.celery.send_task("peertrain.cancel_session", args=[session_id], queue=self.queue)

    def peer_lost(self, session_id: str, peer: str, reason: str) -> None:
        """The session goes on without `peer` as when it goes offline (its strategy decides: or it fails)."""
        self.celery.send_task("peertrain.peer_lost", args=[session_id, peer, reason], queue=self.queue)

    def ping(self) -> None:
        with self.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)


def init_app(app: Flask, celery: Any) -> flask_smorest.Api:
    """Attach every extension; returns the app's OpenAPI-documenting Api to register blueprints on."""
    for key in ("JWT_ACCESS_TOKEN_EXPIRES", "JWT_REFRESH_TOKEN_EXPIRES"):
        if isinstance(app.config.get(key), int):
            app.config[key] = timedelta(seconds=app.config[key])
    jwt.init_app(app)
    app.url_map.converters["objectid"] = ObjectIdConverter
    api = flask_smorest.Api(app)
    api.register_converter(ObjectIdConverter, lambda _: {"type": "string", "pattern": f"^{ObjectIdConverter.regex}$"})
    if STORAGE not in app.extensions:
        app.extensions[STORAGE] = open_storage(
            app.config["STORAGE_URL"], app.config["S3_ENDPOINT_URL"], app.config["S3_REGION"],
            LocalGrants(app.config["PUBLIC_URL"], app.config["GRANT_KEY"]),
        )
    if PASSWORDS not in app.extensions:
        app.extensions[PASSWORDS] = Passwords(app.config["BCRYPT_ROUNDS"], app.config["PASSWORD_HASHING_SLOTS"])
    if DISPATCHER not in app.extensions:
        from tasks import feed

        app.extensions[CELERY] = celery
        app.extensions[DISPATCHER] = Dispatcher(celery, app.config["COORDINATOR_QUEUE"])
        feed.install(celery)  # the session events this process stores (a start, a failed start) are announced
    return api


def storage() -> Storage:
    return current_app.extensions[STORAGE]


def celery_app() -> Any:
    return current_app.extensions[CELERY]


def dispatcher() -> Dispatcher:
    return current_app.extensions[DISPATCHER]


def passwords() -> Passwords:
    return current_app.extensions[PASSWORDS]
