"""`/objects/<key>`: local storage as peers reach it, through grants the coordinator signed.

With S3 storage peers use presigned URLs and this route answers 404. With a local storage directory
(`make run`, or a deployment without S3) it is the local equivalent: a GET reads, a PUT writes, one
object each, until the grant expires or its task is decided, and a PUT no larger than the grant says.
It is not part of the user-facing API (no token; the grant is the credential), so it stays out of the
OpenAPI document.
"""

from __future__ import annotations

import io

from flask import Blueprint, Response, abort, request, stream_with_context

from models import Peer
from models import assignment as assignments
from tasks.storage import LocalStorage, StorageError
from webapp.extensions import storage

blp = Blueprint("objects", __name__, url_prefix="/objects")


def _local() -> LocalStorage:
    store = storage()
    if not isinstance(store, LocalStorage) or store.grants is None:
        abort(404, description="objects are served here only from local storage")
    return store


def _checked(store: LocalStorage, method: str, key: str) -> int | None:
    task = request.args.get("task")
    try:
        cap = store.grants.check(method, key, request.args.get("expires"), request.args.get("signature"),
                                 request.args.get("max_bytes"), task)
    except StorageError as exc:
        abort(403, description=f"this grant does not open {key}: {exc}")
    if task is not None:
        # A grant ends with its task: once its outcome is decided (its result used, its peer left out, its
        # session over), or its peer removed, it opens nothing more.
        assignment = assignments.get(task)
        if assignment is None or assignment.get("outcome") or Peer.objects(name=assignment["peer"]).count() == 0:
            abort(403, description=f"this grant does not open {key}: its task is over")
    return cap


@blp.get("/<path:key>")
def read(key: str) -> Response:
    store = _local()
    _checked(store, "GET", key)
    try:
        size, chunks = store.size(store.url(key)), store.iter_chunks(store.url(key))
    except StorageError:
        abort(404, description=f"no object {key}")
    # The length up front: the reader can refuse an object too large at once, and the answer goes out
    # as one body instead of chunks (small writes that wait on the reader's delayed acknowledgements).
    return Response(stream_with_context(chunks), mimetype="application/octet-stream",
                    headers={"Content-Length": str(size)})


@blp.put("/<path:key>")
def write(key: str) -> tuple[str, int]:
    store = _local()
    cap = _checked(store, "PUT", key)
    if request.content_length is not None and request.content_length > cap:
        abort(413, description=f"the grant allows at most {cap:,} bytes")
    data = request.stream.read(cap + 1)
    if len(data) > cap:
        abort(413, description=f"the grant allows at most {cap:,} bytes")
    store.put(key, io.BytesIO(data))
    return "", 204

