"""Celery workers running as threads of the current process.

The embedded mode needs them (its broker, result backend and mongomock database exist only inside
one process), and so do tests whose coordinator must share the test's mongomock database.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from celery import Celery
from celery.contrib.testing.worker import TestWorkController
from celery.result import _set_task_join_will_block
from celery.worker import state as worker_state


@dataclass
class InProcessWorkers:
    """Workers started one after another in threads; stopped together."""

    app: Celery
    workers: list[TestWorkController] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, queue: str, hostname: str, loglevel: str = "WARNING") -> TestWorkController:
        """Start a worker consuming `queue`, named `hostname`, and wait until it consumes."""
        self.app.finalize()
        self.app.loader.import_default_modules()
        worker = TestWorkController(
            app=self.app, hostname=hostname, queues=[queue], pool="solo", concurrency=1,
            without_heartbeat=False, without_mingle=True, without_gossip=True, task_events=True,
            loglevel=loglevel, ready_callback=None,
            # Several workers in one process must not share one event loop: on a real broker the
            # shared connection state corrupts (UnexpectedFrame).
            use_eventloop=False,
        )
        thread = threading.Thread(target=worker.start, name=f"worker:{hostname}", daemon=True)
        thread.start()
        # Queue selection is app-wide (app.amqp.queues.select): the next worker may only select its
        # queue after this one has built its consumer, or one would consume the other's queue.
        worker.ensure_started()
        # Starting a worker marks the whole process as one where joining a result would block.
        _set_task_join_will_block(False)
        self.workers.append(worker)
        self.threads.append(thread)
        return worker

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every in-process worker (they share one shutdown flag) and wait for their threads."""
        if not self.threads:
            return
        worker_state.should_stop = 0
        try:
            for thread in self.threads:
                thread.join(timeout)
        finally:
            worker_state.should_stop = None
        self.workers.clear()
        self.threads.clear()
