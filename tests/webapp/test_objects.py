"""`/objects/`: peers' door to local storage, opened only by a grant the platform signed."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from webapp.extensions import storage as app_storage


@pytest.fixture
def store(app):
    with app.app_context():
        return app_storage()


def path(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def test_a_read_grant_reads_its_object_and_nothing_else(client, store):
    url = store.put_bytes("users/u/sessions/s/dataset.csv", b"a,b\n1,2\n")
    other = store.put_bytes("users/v/sessions/t/dataset.csv", b"secret")
    grant = store.grant_read(url, 60)
    assert client.get(path(grant)).data == b"a,b\n1,2\n"
    stolen = path(grant).replace("users/u/sessions/s", "users/v/sessions/t")
    response = client.get(stolen)
    assert response.status_code == 403 and response.json["code"] == 403 and "grant" in response.json["message"]
    assert client.get(f"/objects/{store.key_of(other)}").status_code == 403
    assert client.put(path(grant), data=b"x").status_code == 403  # a read grant does not write


def test_a_write_grant_writes_its_object_up_to_its_cap(client, store):
    key = "users/u/sessions/s/peers/p/weights.safetensors"
    grant = store.grant_write(key, 60, max_bytes=10)
    assert client.put(path(grant), data=b"0123456789").status_code == 204
    assert store.get_bytes(store.url(key)) == b"0123456789"
    too_big = client.put(path(grant), data=b"x" * 11)
    assert too_big.status_code == 413 and "at most 10 bytes" in too_big.json["message"]
    assert store.get_bytes(store.url(key)) == b"0123456789"
    assert client.get(path(grant)).status_code == 403  # a write grant does not read


def test_objects_are_not_served_from_s3_storage(tmp_path, db, s3_endpoint):
    from webapp import create_app

    app = create_app({"TESTING": True, "MONGODB_URI": db, "STORAGE_URL": "s3://bucket", "S3_ENDPOINT_URL": s3_endpoint})
    assert app.test_client().get("/objects/x?expires=1&signature=y").status_code == 404


def test_a_grant_for_a_task_ends_with_it(client, store):
    """A peer keeps nothing past its task: once the outcome is decided, or the peer removed, its grants open
    nothing, even before they expire; and the task named cannot be swapped for one still open."""
    from datetime import UTC, datetime

    from bson import ObjectId

    from models import assignment as assignments
    from models import peer as peers

    peers.register("p1")
    session = ObjectId()
    assignments.record([{"_id": f"{session}:{n}:p1", "session_id": session, "peer": "p1", "round": n, "epochs": 1,
                         "position": 0, "sent_at": datetime.now(UTC), "deadline": None} for n in (0, 1)])
    url = store.put_bytes("users/u/sessions/s/shards/p1.csv", b"a,b\n1,2\n")
    first, second = store.grant_read(url, 60, task=f"{session}:0:p1"), store.grant_read(url, 60, task=f"{session}:1:p1")
    upload = store.grant_write("users/u/sessions/s/peers/p1/w", 60, max_bytes=10, task=f"{session}:0:p1")
    assert client.get(path(first)).data == b"a,b\n1,2\n"

    assert assignments.claim(f"{session}:0:p1", {"status": "lost"}, datetime.now(UTC))
    for method, grant in (("get", first), ("put", upload)):
        response = getattr(client, method)(path(grant), data=b"x")
        assert response.status_code == 403 and "task is over" in response.json["message"]
    swapped = path(first).replace(f"{session}%3A0%3Ap1", f"{session}%3A1%3Ap1")
    assert swapped != path(first) and client.get(swapped).status_code == 403
    assert client.get(path(second)).status_code == 200

    peers.unregister("p1")
    assert client.get(path(second)).status_code == 403
