"""Which errors mean a service did not answer (worth a retry, 503) rather than a bug (500)."""

from __future__ import annotations

from collections.abc import Iterator

import kombu.exceptions
import pymongo.errors

# Socket-level refusals and timeouts, the broker's and the database's "cannot reach it".
_UNREACHABLE: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    kombu.exceptions.OperationalError,
    pymongo.errors.ConnectionFailure,
)


def _chain(error: BaseException) -> Iterator[BaseException]:
    # Storage wraps boto's errors in its own (`raise StorageError(...) from exc`): look through causes.
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def transient(error: BaseException) -> bool:
    """True when `error`, or what caused it, says the broker, the database or object storage did not answer."""
    for cause in _chain(error):
        if isinstance(cause, _UNREACHABLE) or _storage_unreachable(cause):
            return True
    return False


def _storage_unreachable(error: BaseException) -> bool:
    module = type(error).__module__
    if not module.startswith("botocore"):
        return False  # botocore is imported only where S3 storage is in use, and only on this error path
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(error, ConnectionError | HTTPClientError):
        return True
    if isinstance(error, ClientError):
        # S3's own "try again" answers: 500 InternalError, 503 SlowDown / ServiceUnavailable.
        return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500
    return False
