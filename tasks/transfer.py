"""A peer's side of storage: reading and writing objects through the grants in its task, over HTTP(S).

Peers hold no storage credentials: a grant (an S3 presigned URL, or a signed URL of the API's
`/objects/` route for local storage) is the only door, and it opens one object until it expires.
Grants are credentials, so messages and logs name only the object's address, never the query string.
Transient failures (a refused connection, a 5xx) are retried a few times with backoff; a refusal
(expired or forged grant, missing object) is not.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from functools import cache
from typing import BinaryIO, TypeVar
from urllib.parse import urlsplit

CHUNK = 1 << 20
OCTET_STREAM = "application/octet-stream"
TIMEOUT = 60.0
RETRIES = (0.5, 1.0, 2.0)
# An object small enough to travel in the task itself (RFC 2397): no storage round trip before training.
INLINE = "data:application/octet-stream;base64,"

T = TypeVar("T")


class TransferError(RuntimeError):
    """An object could not be read or written through its grant."""


def inline(data: bytes) -> str:
    """A grant that holds `data` itself: what `fetch` reads from it is `data`, with no request."""
    return INLINE + base64.b64encode(data).decode("ascii")


def where(url: str) -> str:
    """A grant's URL without its query string (which holds the signature); an inline one, by its size."""
    if url.startswith("data:"):
        return f"the object in the task ({len(url)} characters)"
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


@cache
def _context() -> ssl.SSLContext:
    # SSL_CERT_FILE / SSL_CERT_DIR name a private CA (a MinIO with its own certificate), as OpenSSL reads them.
    # Made once per process: loading the CA store costs ~15-20 ms, which every transfer used to pay.
    return ssl.create_default_context()


def _open(request: str | urllib.request.Request):
    url = request if isinstance(request, str) else request.full_url
    context = _context() if url.startswith("https:") else None
    return urllib.request.urlopen(request, timeout=TIMEOUT, context=context)


def _retrying(action: str, url: str, attempt: Callable[[], T], sleep: Callable[[float], None] = time.sleep,
              retries: tuple[float, ...] = RETRIES) -> T:
    for pause in (*retries, None):
        try:
            return attempt()
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or pause is None:
                raise TransferError(f"could not {action} {where(url)}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            if pause is None:
                reason = getattr(exc, "reason", exc)
                raise TransferError(f"could not {action} {where(url)}: {reason}") from None
        sleep(pause)
    raise AssertionError("unreachable")


def _copy_capped(response, out: BinaryIO, url: str, max_bytes: int) -> int:
    length = response.headers.get("Content-Length")
    if length is not None and int(length) > max_bytes:
        raise TransferError(f"{where(url)} holds {int(length):,} bytes, more than the {max_bytes:,} allowed")
    copied = 0
    while chunk := response.read(CHUNK):
        copied += len(chunk)
        if copied > max_bytes:
            raise TransferError(f"{where(url)} holds more than the {max_bytes:,} bytes allowed")
        out.write(chunk)
    return copied


def download(url: str, path: str | os.PathLike, max_bytes: int) -> int:
    """Save the object `url` grants to `path`, refusing more than `max_bytes`; returns the bytes read."""

    def attempt() -> int:
        with _open(url) as response, open(path, "wb") as out:
            return _copy_capped(response, out, url, max_bytes)

    return _retrying("read", url, attempt)


def fetch(url: str, max_bytes: int) -> bytes:
    """The object `url` grants, in memory (weights), refusing more than `max_bytes`."""
    if url.startswith("data:"):
        return _inline(url, max_bytes)

    def attempt() -> bytes:
        buffer = io.BytesIO()
        with _open(url) as response:
            _copy_capped(response, buffer, url, max_bytes)
        return buffer.getvalue()

    return _retrying("read", url, attempt)


def _inline(url: str, max_bytes: int) -> bytes:
    if not url.startswith(INLINE):
        raise TransferError(f"{where(url)} is not base64-encoded bytes")
    encoded = url[len(INLINE):]
    if len(encoded) // 4 * 3 > max_bytes + 2:  # checked before decoding, as a download is while it reads
        raise TransferError(f"{where(url)} holds more than the {max_bytes:,} bytes allowed")
    try:
        data = base64.b64decode(encoded, validate=True)
    except binascii.Error as exc:
        raise TransferError(f"{where(url)} is not valid base64: {exc}") from None
    if len(data) > max_bytes:
        raise TransferError(f"{where(url)} holds {len(data):,} bytes, more than the {max_bytes:,} allowed")
    return data


def upload(url: str, data: bytes, retry: bool = True) -> None:
    """Write `data` as the object `url` grants (an HTTP PUT, as S3 presigned URLs and the API expect); `retry`:
    again after a pause when the server is away or fails (3 times, 3.5 s in all)."""

    def attempt() -> None:
        request = urllib.request.Request(url, data=data, method="PUT",
                                         headers={"Content-Type": OCTET_STREAM, "Content-Length": str(len(data))})
        with _open(request) as response:
            response.read()

    _retrying("write", url, attempt, retries=RETRIES if retry else ())
