"""Whether the API's services answer."""

from __future__ import annotations

import logging

from flask.views import MethodView

import models
from webapp.extensions import Blueprint, dispatcher, storage
from webapp.schemas import HealthSchema

blp = Blueprint("health", __name__, description="Liveness")
log = logging.getLogger(__name__)

# What a failing check reports; why it failed goes to the log, never to this unauthenticated route.
UNAVAILABLE = "unavailable"


@blp.route("/healthz")
class Health(MethodView):
    @blp.response(200, HealthSchema)
    @blp.alt_response(503, schema=HealthSchema, description="a service does not answer")
    def get(self):
        """Check the database, the broker and object storage."""
        checks = {}
        for name, probe in (("database", models.ping), ("broker", dispatcher().ping), ("storage", storage().ping)):
            try:
                probe()
                checks[name] = "ok"
            except Exception:  # noqa: BLE001 - any failure is the answer here
                log.warning("health check %s failed", name, exc_info=True)
                checks[name] = UNAVAILABLE
        ok = all(v == "ok" for v in checks.values())
        return {"ok": ok, "checks": checks}, 200 if ok else 503
