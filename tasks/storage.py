"""Object storage for datasets, shards and weights: S3 (or any S3-compatible server) or a local directory.

Objects are named by URL, `s3://bucket/key` or `file:///path`; only the platform's own processes hold
storage credentials and read or write by those URLs. A peer gets *grants* instead: URLs that let it
read one object, or write one, until they expire — S3 presigned URLs, or for local storage URLs of
the API's `/objects/` route signed with a key only the platform holds (`LocalGrants`).
Reads and writes stream through file objects; nothing is held twice in memory.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import quote, urlencode, urlsplit

from settings import Settings

CHUNK = 1 << 20
OCTET_STREAM = "application/octet-stream"
# S3's longest presigned lifetime (SigV4).
MAX_GRANT_SECONDS = 7 * 24 * 3600


class StorageError(RuntimeError):
    """An object could not be read or written."""


class Storage(Protocol):
    """What the API and the tasks need from object storage."""

    def url(self, key: str) -> str: ...
    def put(self, key: str, stream: BinaryIO) -> str: ...
    def put_bytes(self, key: str, data: bytes) -> str: ...
    def download(self, url: str, path: str | os.PathLike) -> int: ...
    def get_bytes(self, url: str, max_bytes: int | None = None) -> bytes: ...
    def grant_read(self, url: str, seconds: int, task: str | None = None) -> str: ...
    def grant_write(self, key: str, seconds: int, max_bytes: int, task: str | None = None) -> str: ...
    def iter_chunks(self, url: str) -> Iterator[bytes]: ...
    def exists(self, url: str) -> bool: ...
    def delete_prefix(self, key: str) -> None: ...
    def ping(self) -> None: ...


class LocalGrants:
    """Grants on local storage: URLs of the API's `/objects/<key>` route, signed with the platform's key.

    The signature covers the method, the key, the expiry, (for writes) the size cap and the task it is
    for, so a grant opens one object for one purpose until it expires, and cannot be turned into another;
    whoever serves it (webapp/objects.py) also refuses it once its task is decided.
    """

    def __init__(self, base_url: str, key: bytes, clock=time.time) -> None:
        self.base_url = base_url.rstrip("/")
        self.key = key
        self.clock = clock

    def _signature(self, method: str, key: str, expires: int, max_bytes: int | None, task: str | None) -> str:
        message = f"{method}\n{key}\n{expires}\n{'' if max_bytes is None else max_bytes}\n{task or ''}".encode()
        return hmac.new(self.key, message, hashlib.sha256).hexdigest()

    def url(self, method: str, key: str, seconds: int, max_bytes: int | None = None, task: str | None = None) -> str:
        expires = int(self.clock()) + min(seconds, MAX_GRANT_SECONDS)
        query = {"expires": expires, **({} if max_bytes is None else {"max_bytes": max_bytes}),
                 **({} if task is None else {"task": task}),
                 "signature": self._signature(method, key, expires, max_bytes, task)}
        return f"{self.base_url}/objects/{quote(key)}?{urlencode(query)}"

    def check(self, method: str, key: str, expires: str, signature: str, max_bytes: str | None = None,
              task: str | None = None) -> int | None:
        """The write cap (None for reads) if the grant is genuine and current; StorageError otherwise."""
        try:
            expiry, cap = int(expires), None if max_bytes is None else int(max_bytes)
        except (TypeError, ValueError):
            raise StorageError("the grant is malformed") from None
        expected = self._signature(method, key, expiry, cap, task)
        if not hmac.compare_digest(expected, signature or ""):
            raise StorageError("the grant's signature does not match")
        if expiry < self.clock():
            raise StorageError("the grant has expired")
        return cap


class LocalStorage:
    """Objects as files under one directory (the embedded default)."""

    def __init__(self, root: str | os.PathLike, grants: LocalGrants | None = None) -> None:
        self.root = Path(root).resolve()
        self.grants = grants

    def key_of(self, url: str) -> str:
        """The key of an object's URL (the inverse of `url`)."""
        return self._path_of(url).relative_to(self.root).as_posix()

    def url(self, key: str) -> str:
        return self._path(key).as_uri()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise StorageError(f"key {key!r} leaves the storage directory")
        return path

    def _path_of(self, url: str) -> Path:
        parts = urlsplit(url)
        if parts.scheme != "file":
            raise StorageError(f"{url!r} is not in local storage {self.root}")
        path = Path(parts.path).resolve()
        if not path.is_relative_to(self.root):
            raise StorageError(f"{url!r} is outside local storage {self.root}")
        return path

    def put(self, key: str, stream: BinaryIO) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target and rename, so a reader never sees half an object.
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
            shutil.copyfileobj(stream, tmp, CHUNK)
        os.replace(tmp.name, path)
        return path.as_uri()

    def put_bytes(self, key: str, data: bytes) -> str:
        return self.put(key, io.BytesIO(data))

    def download(self, url: str, path: str | os.PathLike) -> int:
        source = self._path_of(url)
        try:
            shutil.copyfile(source, path)
        except FileNotFoundError:
            raise StorageError(f"no object at {url}") from None
        return os.path.getsize(path)

    def get_bytes(self, url: str, max_bytes: int | None = None) -> bytes:
        path = self._path_of(url)
        try:
            with path.open("rb") as f:
                _check_size(url, os.fstat(f.fileno()).st_size, max_bytes)
                return f.read()
        except FileNotFoundError:
            raise StorageError(f"no object at {url}") from None

    def grant_read(self, url: str, seconds: int, task: str | None = None) -> str:
        return self._grants().url("GET", self.key_of(url), seconds, task=task)

    def grant_write(self, key: str, seconds: int, max_bytes: int, task: str | None = None) -> str:
        self._path(key)  # refuse a key outside the directory now, not when the peer writes
        return self._grants().url("PUT", key, seconds, max_bytes, task=task)

    def _grants(self) -> LocalGrants:
        if self.grants is None:
            raise StorageError("local storage was opened without a signing key: it cannot grant access")
        return self.grants

    def size(self, url: str) -> int:
        """The object's length in bytes; StorageError if there is none."""
        try:
            return self._path_of(url).stat().st_size
        except FileNotFoundError:
            raise StorageError(f"no object at {url}") from None

    def exists(self, url: str) -> bool:
        return self._path_of(url).is_file()

    def iter_chunks(self, url: str) -> Iterator[bytes]:
        path = self._path_of(url)
        if not path.exists():
            raise StorageError(f"no object at {url}")

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as f:
                while chunk := f.read(CHUNK):
                    yield chunk

        return chunks()

    def delete_prefix(self, key: str) -> None:
        shutil.rmtree(self._path(key), ignore_errors=True)

    def ping(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"{self.root} is not writable")


class S3Storage:
    """Objects in an S3 bucket (AWS, MinIO, moto, …) under an optional key prefix."""

    def __init__(self, bucket: str, prefix: str = "", client=None, endpoint_url: str | None = None,
                 region: str | None = None) -> None:
        if client is None:
            import boto3
            from botocore.config import Config

            # Presigned URLs name the endpoint as given (path style), signed with SigV4 as MinIO wants.
            config = Config(signature_version="s3v4", s3={"addressing_style": "path"} if endpoint_url else {})
            client = boto3.client("s3", endpoint_url=endpoint_url or None, region_name=region or None,
                                  config=config)
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _locate(self, url: str) -> tuple[str, str]:
        parts = urlsplit(url)
        if parts.scheme != "s3":
            raise StorageError(f"{url!r} is not an s3:// URL")
        return parts.netloc, parts.path.lstrip("/")

    def put(self, key: str, stream: BinaryIO) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            # upload_fileobj streams in parts (multipart above 8 MiB) instead of reading it all.
            self.client.upload_fileobj(stream, self.bucket, self._key(key))
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"could not write {self.url(key)}: {exc}") from exc
        return self.url(key)

    def put_bytes(self, key: str, data: bytes) -> str:
        return self.put(key, io.BytesIO(data))

    def download(self, url: str, path: str | os.PathLike) -> int:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = self._locate(url)
        try:
            self.client.download_file(bucket, key, os.fspath(path))
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"could not read {url}: {exc}") from exc
        return os.path.getsize(path)

    def _body(self, url: str):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = self._locate(url)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"]
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"could not read {url}: {exc}") from exc

    def get_bytes(self, url: str, max_bytes: int | None = None) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = self._locate(url)
        try:
            response = self.client.get_object(Bucket=bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"could not read {url}: {exc}") from exc
        with response["Body"] as body:
            _check_size(url, response["ContentLength"], max_bytes)
            return body.read()

    def grant_read(self, url: str, seconds: int, task: str | None = None) -> str:
        # A presigned URL cannot be revoked: it ends when it expires, whatever becomes of its task.
        bucket, key = self._locate(url)
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=min(seconds, MAX_GRANT_SECONDS))

    def grant_write(self, key: str, seconds: int, max_bytes: int, task: str | None = None) -> str:
        # A presigned PUT cannot cap the size it accepts: whoever reads the object caps it (get_bytes).
        return self.client.generate_presigned_url(
            "put_object", Params={"Bucket": self.bucket, "Key": self._key(key), "ContentType": OCTET_STREAM},
            ExpiresIn=min(seconds, MAX_GRANT_SECONDS))

    def iter_chunks(self, url: str) -> Iterator[bytes]:
        return self._body(url).iter_chunks(CHUNK)

    def exists(self, url: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = self._locate(url)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"could not look up {url}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"could not look up {url}: {exc}") from exc
        return True

    def delete_prefix(self, key: str) -> None:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(key).rstrip("/") + "/"):
            objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if objects:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects})

    def ping(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"bucket {self.bucket} does not answer: {exc}") from exc

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (MinIO and moto start empty)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)


def _check_size(url: str, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise StorageError(f"{url} holds {size:,} bytes, more than the {max_bytes:,} allowed")


def from_settings(settings: Settings) -> LocalStorage | S3Storage:
    """The storage that STORAGE_URL, S3_ENDPOINT_URL and S3_REGION configure (local grants name PUBLIC_URL)."""
    return open_storage(settings.storage_url, settings.s3_endpoint_url, settings.s3_region,
                        LocalGrants(settings.public_base_url, settings.grant_key))


def open_storage(url: str, endpoint_url: str = "", region: str = "",
                 grants: LocalGrants | None = None) -> LocalStorage | S3Storage:
    """Storage for `url`: `s3://bucket[/prefix]`, `file:///dir` or a plain directory path."""
    parts = urlsplit(url)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"STORAGE_URL {url!r} names no bucket")
        return S3Storage(parts.netloc, parts.path, endpoint_url=endpoint_url, region=region)
    if parts.scheme == "file":
        return LocalStorage(parts.path, grants)
    if parts.scheme:
        raise ValueError(f"STORAGE_URL {url!r}: use s3://bucket/prefix, file:///dir or a directory")
    return LocalStorage(url, grants)


class HashingReader:
    """Wraps a binary stream, counting and hashing what is read through it (one pass over an upload)."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.bytes = 0
        self._sha = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.bytes += len(data)
        self._sha.update(data)
        return data

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()
