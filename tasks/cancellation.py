"""Telling running peers to stop, through the result backend: peers hold no database credentials.

The coordinator stores a marker result under a per-session id; a training task checks for it
between batches (at most once a second) and stops early. The marker works with any result
backend (Redis, the in-memory one of the embedded mode, a database), unlike `revoke(terminate=True)`,
which kills the worker's child process and cannot reach a solo-pool worker at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from celery import Celery, states

STOP = states.REVOKED


def marker_id(session_id: str) -> str:
    return f"peertrain-stop-{session_id}"


def request_stop(app: Celery, session_id: str, reason: str) -> None:
    """Ask every peer still training for `session_id` to stop."""
    app.backend.store_result(marker_id(session_id), {"reason": reason}, STOP)


def stop_requested(app: Celery, session_id: str) -> bool:
    return app.backend.get_state(marker_id(session_id)) == STOP


def stop_check(app: Celery, session_id: str, every: float = 1.0,
               clock: Callable[[], float] = time.monotonic) -> Callable[[], bool]:
    """A `should_stop` callback for the training loop that asks the backend at most once per `every` s."""
    next_check = clock()
    stopped = False

    def should_stop() -> bool:
        nonlocal next_check, stopped
        if not stopped and clock() >= next_check:
            next_check = clock() + every
            stopped = stop_requested(app, session_id)
        return stopped

    return should_stop
