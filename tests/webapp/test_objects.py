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
