"""Tell this process's listeners that a session changed (plain Python: no Flask, Celery or torch).

The API keeps recent answers of its polled views (webapp/polling.py). When the coordinator or the
monitor runs in the same process as the API (`make run`, the tests), every write to a session goes
through TrainingSession's queryset and is announced here, so those answers are dropped at once;
writers in other processes are not seen, and the API's own time limit bounds how stale it can be.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

from bson import ObjectId
from mongoengine.queryset import QuerySet

log = logging.getLogger(__name__)

_listeners: list[weakref.WeakMethod] = []
_lock = threading.Lock()


def subscribe(listener: Callable[[str | None], None]) -> None:
    """Call bound method `listener(session_id)` after each write to a session, until its object is gone;
    the id is None when a write's filter does not name the sessions it changed."""
    with _lock:
        _listeners.append(weakref.WeakMethod(listener))


def session_changed(session_id: Any) -> None:
    """Announce a write to session `session_id` (None: to sessions this process cannot name)."""
    with _lock:
        _listeners[:] = [ref for ref in _listeners if ref() is not None]
        listeners = [ref() for ref in _listeners]
    for listener in listeners:
        if listener is None:
            continue
        try:
            listener(None if session_id is None else str(session_id))
        except Exception:  # a listener's failure must not fail the write that already happened
            log.exception("a session-change listener failed")


def _ids(query: dict[str, Any]) -> list[Any]:
    value = query.get("_id")
    if isinstance(value, dict):
        return list(value.get("$in", [])) + ([value["$eq"]] if "$eq" in value else [])
    return [] if value is None else [value]


class AnnouncingQuerySet(QuerySet):
    """A QuerySet whose updates by id announce the sessions they changed (update_one goes through update)."""

    def update(self, *args: Any, **kwargs: Any) -> Any:
        result = super().update(*args, **kwargs)
        changed = result if isinstance(result, int) else 1
        if changed:
            ids = [i for i in _ids(self._query) if isinstance(i, ObjectId | str)]
            # A filter without plain ids ($or, another field): say that something changed, not what.
            for session_id in ids or [None]:
                session_changed(session_id)
        return result
