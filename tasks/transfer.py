"""A peer's side of storage: reading and writing objects through the grants in its task, over HTTP(S).

Peers hold no storage credentials: a grant (an S3 presigned URL, or a signed URL of the API's
`/objects/` route for local storage) is the only door, and it opens one object until it expires.
Grants are credentials, so messages and logs name only the object's address, never the query string.
Transient failures (a refused connection, a 5xx) are retried a few times with backoff; a refusal
(expired or forged grant, missing object) is not. Each thread keeps its connection to each server open
between transfers (HTTP/1.1 keep-alive), so a peer's round costs no new TCP or TLS handshake; through a
proxy (http_proxy, https_proxy) transfers go urllib's way, one connection each.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any, BinaryIO, TypeVar
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


class _Connections(threading.local):
    """This thread's open connection to each server it reached: a peer writes its weights every round, and a new
    connection costs a round trip (two more with TLS) that one kept open does not."""

    def __init__(self) -> None:
        self.open: dict[tuple[str, str], http.client.HTTPConnection] = {}


_connections = _Connections()
# A forked child shares its parent's sockets: it opens its own.
os.register_at_fork(after_in_child=lambda: _connections.open.clear())


@contextmanager
def _open(request: str | urllib.request.Request) -> Iterator[Any]:
    """The response to `request` (a URL: GET), over this thread's kept connection to its server; an HTTP error
    status raises `urllib.error.HTTPError`, as urllib would. Through a proxy, urllib's own way."""
    url = request if isinstance(request, str) else request.full_url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or _proxied(parts):
        # An opener of its own: it reads the proxy settings as they are now.
        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=_context()))
        with opener.open(request, timeout=TIMEOUT) as response:
            yield response
        return
    method, body, headers = "GET", None, {}
    if not isinstance(request, str):
        method, body, headers = request.get_method(), request.data, dict(request.header_items())
    key = (parts.scheme, parts.netloc)
    response = _exchange(key, parts, method, parts.path + (f"?{parts.query}" if parts.query else ""), body, headers)
    try:
        if response.status >= 300:  # grants name objects, never a redirect: anything but success is an error
            # Unread, whatever its size: the connection is dropped below, not left mid-response.
            raise urllib.error.HTTPError(url, response.status, response.reason, response.headers, None)
        yield response
        if not response.isclosed():  # the caller stopped short of the end: the connection is mid-response
            _forget(key)
    except BaseException:
        _forget(key)
        raise


def _exchange(key: tuple[str, str], parts: Any, method: str, target: str, body: bytes | None,
              headers: dict[str, str]) -> http.client.HTTPResponse:
    """Send one request on the kept connection (a new one if none). A kept one the server closed while it was
    idle is replaced at once, once (a grant's GET and PUT may be sent twice); any other failure is the caller's."""
    for attempt in range(2):
        connection = _connections.open.get(key)
        reused = connection is not None
        if connection is None:
            connection = _connections.open[key] = _connect(parts)
        try:
            connection.request(method, target, body=body, headers=headers)
            return connection.getresponse()
        except ConnectionError:  # RemoteDisconnected, a reset, a broken pipe
            _forget(key)
            if not reused or attempt:
                raise
        except BaseException:
            _forget(key)
            raise
    raise AssertionError("unreachable")


def _connect(parts: Any) -> http.client.HTTPConnection:
    if parts.scheme == "https":
        return http.client.HTTPSConnection(parts.hostname, parts.port, timeout=TIMEOUT, context=_context())
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT)


def close_connections() -> None:
    """Close this thread's kept connections (the next transfer to each server opens a new one)."""
    for key in list(_connections.open):
        _forget(key)


def _forget(key: tuple[str, str]) -> None:
    connection = _connections.open.pop(key, None)
    if connection is not None:
        connection.close()


def _proxied(parts: Any) -> bool:
    """Whether urllib would reach this URL through a proxy (http_proxy, https_proxy, no_proxy in the environment)."""
    proxies = urllib.request.getproxies()
    return parts.scheme in proxies and not urllib.request.proxy_bypass(parts.hostname or "")


def _retrying(action: str, url: str, attempt: Callable[[], T], sleep: Callable[[float], None] = time.sleep,
              retries: tuple[float, ...] = RETRIES) -> T:
    for pause in (*retries, None):
        try:
            return attempt()
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or pause is None:
                raise TransferError(f"could not {action} {where(url)}: HTTP {exc.code} {exc.reason}") from None
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, TLS, a garbled reply
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
