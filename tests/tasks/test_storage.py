"""Object storage: the local directory backend and S3 through a real HTTP endpoint (moto's server)."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from tasks.storage import HashingReader, LocalStorage, S3Storage, StorageError, open_storage


@pytest.fixture
def s3(s3_endpoint, request) -> S3Storage:
    bucket = f"test-{abs(hash(request.node.name)) % 10**8}"
    storage = open_storage(f"s3://{bucket}/prefix", endpoint_url=s3_endpoint, region="us-east-1")
    storage.ensure_bucket()
    return storage


@pytest.fixture
def local(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path / "objects")


@pytest.fixture(params=["local", "s3"])
def storage(request):
    return request.getfixturevalue(request.param)


def test_put_then_read_back_in_every_way(storage, tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)
    url = storage.put("users/u1/sessions/s1/dataset.csv", io.BytesIO(data))
    assert url == storage.url("users/u1/sessions/s1/dataset.csv")
    assert storage.get_bytes(url) == data
    assert b"".join(storage.iter_chunks(url)) == data
    target = tmp_path / "copy.bin"
    assert storage.download(url, target) == len(data)
    assert target.read_bytes() == data


def test_missing_objects_raise_storage_error(storage, tmp_path):
    url = storage.url("nothing/here")
    with pytest.raises(StorageError):
        storage.get_bytes(url)
    with pytest.raises(StorageError):
        storage.download(url, tmp_path / "x")


def test_delete_prefix_removes_a_sessions_objects(storage):
    kept = storage.put_bytes("sessions/keep/a", b"1")
    gone = [storage.put_bytes(f"sessions/drop/{n}", b"2") for n in "abc"]
    storage.delete_prefix("sessions/drop")
    for url in gone:
        with pytest.raises(StorageError):
            storage.get_bytes(url)
    assert storage.get_bytes(kept) == b"1"


def test_ping(storage):
    storage.ping()


def test_s3_keys_carry_the_prefix(s3):
    assert s3.put_bytes("k", b"v") == f"s3://{s3.bucket}/prefix/k"


def test_a_missing_bucket_fails_ping(s3_endpoint):
    with pytest.raises(StorageError):
        open_storage("s3://no-such-bucket", endpoint_url=s3_endpoint).ping()


def test_local_keys_cannot_escape_the_directory(local):
    with pytest.raises(StorageError):
        local.put_bytes("../outside", b"x")
    with pytest.raises(StorageError):
        local.get_bytes(Path("/etc/hostname").as_uri())


@pytest.mark.parametrize(("url", "kind"), [("/tmp/x", LocalStorage), ("file:///tmp/x", LocalStorage),
                                           ("s3://bucket/p", S3Storage)])
def test_open_storage_picks_the_backend(url, kind):
    assert isinstance(open_storage(url), kind)


def test_open_storage_rejects_other_schemes():
    with pytest.raises(ValueError, match="STORAGE_URL"):
        open_storage("ftp://host/x")


def test_hashing_reader_counts_and_hashes_in_one_pass():
    data = os.urandom(100_000)
    reader = HashingReader(io.BytesIO(data))
    while reader.read(4096):
        pass
    assert reader.bytes == len(data)
    assert reader.sha256 == hashlib.sha256(data).hexdigest()


def test_reads_are_capped_before_the_object_is_read(storage):
    url = storage.put_bytes("w.safetensors", b"x" * 1000)
    assert storage.get_bytes(url, max_bytes=1000) == b"x" * 1000
    with pytest.raises(StorageError, match="more than the 999 allowed"):
        storage.get_bytes(url, max_bytes=999)


def test_s3_grants_read_and_write_one_object_over_plain_http(s3, tmp_path):
    from tasks import transfer

    url = s3.put_bytes("users/u/sessions/s/dataset.csv", b"a,b\n1,2\n")
    read = s3.grant_read(url, 60)
    assert "X-Amz-Signature" in read and transfer.fetch(read, 100) == b"a,b\n1,2\n"
    write = s3.grant_write("users/u/sessions/s/peers/p/weights.safetensors", 60, max_bytes=100)
    transfer.upload(write, b"weights")
    assert s3.get_bytes(s3.url("users/u/sessions/s/peers/p/weights.safetensors")) == b"weights"
    with pytest.raises(transfer.TransferError, match="more than the 3 allowed"):
        transfer.fetch(read, 3)
    # A grant is a credential: errors name the object, never the signature.
    with pytest.raises(transfer.TransferError) as refused:
        transfer.fetch(read.replace("dataset.csv", "missing.csv"), 100)
    assert "Signature" not in str(refused.value) and "missing.csv" in str(refused.value)


def test_local_grants_open_one_object_for_one_purpose_until_they_expire(tmp_path):
    from tasks.storage import LocalGrants

    now = [1000.0]
    grants = LocalGrants("http://api.example", b"k" * 32, clock=lambda: now[0])
    store = LocalStorage(tmp_path / "objects", grants)
    url = grants.url("PUT", "a/w.safetensors", 60, max_bytes=500)
    query = dict(part.split("=") for part in url.split("?")[1].split("&"))
    assert url.startswith("http://api.example/objects/a/w.safetensors?")
    assert grants.check("PUT", "a/w.safetensors", query["expires"], query["signature"], query["max_bytes"]) == 500
    for method, key, expires, cap in (("GET", "a/w.safetensors", query["expires"], query["max_bytes"]),
                                      ("PUT", "b/w.safetensors", query["expires"], query["max_bytes"]),
                                      ("PUT", "a/w.safetensors", str(int(query["expires"]) + 1), query["max_bytes"]),
                                      ("PUT", "a/w.safetensors", query["expires"], "10000000")):
        with pytest.raises(StorageError, match="signature"):
            grants.check(method, key, expires, query["signature"], cap)
    now[0] += 61
    with pytest.raises(StorageError, match="expired"):
        grants.check("PUT", "a/w.safetensors", query["expires"], query["signature"], query["max_bytes"])
    with pytest.raises(StorageError, match="leaves the storage directory"):
        store.grant_write("../outside", 60, 10)
    with pytest.raises(StorageError, match="cannot grant"):
        LocalStorage(tmp_path / "objects").grant_read(store.url("a"), 60)


def test_an_object_sent_in_the_task_is_read_as_a_grant_is_capped_and_never_named_in_full():
    from tasks import transfer

    grant = transfer.inline(b"\x00weights\xff" * 100)
    assert transfer.fetch(grant, 900) == b"\x00weights\xff" * 100  # 900 bytes
    with pytest.raises(transfer.TransferError, match="more than the 899 allowed") as refused:
        transfer.fetch(grant, 899)
    assert grant[40:] not in str(refused.value) and "in the task" in str(refused.value)
    with pytest.raises(transfer.TransferError, match="not valid base64"):
        transfer.fetch(grant[:-3] + "!!=", 1000)
    with pytest.raises(transfer.TransferError, match="not base64-encoded"):
        transfer.fetch("data:text/plain,hello", 1000)
