"""The peers the platform knows, and which of them can take work."""

from __future__ import annotations

from flask.views import MethodView
from flask_jwt_extended import jwt_required

from models import Peer
from models.peer import ONLINE, TRAINING
from webapp.extensions import Blueprint
from webapp.schemas import PeerListSchema

blp = Blueprint("peers", __name__, url_prefix="/peers", description="Peer workers")


@blp.route("")
class Peers(MethodView):
    @jwt_required()
    @blp.etag
    @blp.response(200, PeerListSchema)
    @blp.doc(security=[{"bearerAuth": []}])
    def get(self):
        """Every known peer with its status and record; `online` counts the reachable ones, `free` those idle."""
        peers = list(Peer.objects.order_by("name"))
        return {"peers": peers, "online": sum(p.status in (ONLINE, TRAINING) for p in peers),
                "free": sum(p.status == ONLINE for p in peers), "total": len(peers)}
