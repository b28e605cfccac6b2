"""What the coordinator's code is handed instead of reaching for globals: the app, settings, storage, a clock.

Built once per process by whoever assembles the coordinator (tasks/coordinator.py `create_app`, the
embedded platform, a test) and passed to every strategy, so a test can hand its own storage and clock.
It also keeps what the coordinator reads again and again (held-out rows, global weights), read once per
process: those objects never change once written.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from models.db import utcnow
from settings import Settings

if TYPE_CHECKING:
    from celery import Celery

    from tasks.gate import Gate
    from tasks.storage import Storage


class Clock:
    """The time, as the database stores it (naive UTC), and a monotonic one for durations."""

    def now(self) -> datetime:
        return utcnow()

    def monotonic(self) -> float:
        return time.monotonic()


class FrozenClock(Clock):
    """A clock that moves only when told (tests)."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or utcnow()
        self._monotonic = 0.0

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)
        self._monotonic += seconds


class Remembered:
    """A few values by key, each made once (least recently used go first); thread-safe."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._values: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
        return self.put(key, make())

    def put(self, key: Any, value: Any) -> Any:
        """Remember `value` as `key`'s (made elsewhere, e.g. as it was written)."""
        with self._lock:
            self._values[key] = value
            self._values.move_to_end(key)
            while len(self._values) > self.keep:
                self._values.popitem(last=False)
        return value


@dataclass
class Services:
    """The coordinator's collaborators."""

    app: Celery
    settings: Settings
    storage: Storage
    clock: Clock = field(default_factory=Clock)
    tables: Remembered = field(default_factory=lambda: Remembered(8))  # held-out rows, by object
    states: Remembered = field(default_factory=lambda: Remembered(16))  # global weights, by object
    blobs: Remembered = field(default_factory=lambda: Remembered(16))  # global weights as stored, by object
    _gate: Gate | None = field(default=None, repr=False)

    @property
    def gate(self) -> Gate:
        if self._gate is None:
            from tasks.gate import Gate

            self._gate = Gate(self.storage, self.clock, train_time_limit=self.settings.train_time_limit)
        return self._gate

    @property
    def queue(self) -> str:
        """The coordinator's own queue."""
        return self.settings.coordinator_queue
