"""Celery workers running as threads of the current process.

The embedded mode needs them (its broker, result backend and mongomock database exist only inside
one process), and so do tests whose coordinator must share the test's mongomock database. Each
worker may belong to its own app: in-process peers run the peer's app, each with its own login.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from celery import Celery
from celery.utils import timer2
from celery.worker import WorkController
from celery.worker import state as worker_state


class ThreadWorker(WorkController):
    """A worker that says when its consumer is ready, so the next one can be started after it."""

    def __init__(self, *args, **kwargs) -> None:
        self.ready = threading.Event()
        super().__init__(*args, **kwargs)

    def on_consumer_ready(self, consumer) -> None:
        self.ready.set()


def _timer_of(app: Celery) -> type[timer2.Timer]:
    """The worker's timer thread, running under `app`: a task retried with a countdown (an ETA) runs in
    that thread, and Celery finds its task under the thread's current app (or fails: NotRegistered)."""

    class AppTimer(timer2.Timer):
        def run(self) -> None:
            app.set_current()
            super().run()

    return AppTimer


@dataclass
class InProcessWorkers:
    """Workers started one after another in threads; stopped together."""

    workers: list[ThreadWorker] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, app: Celery, queue: str, hostname: str, loglevel: str = "WARNING",
              timeout: float = 30.0) -> ThreadWorker:
        """Start a worker of `app` consuming `queue`, named `hostname`, and wait until it consumes."""
        app.finalize()
        app.loader.import_default_modules()
        worker = ThreadWorker(
            app=app, hostname=hostname, queues=[queue], pool="solo", concurrency=1,
            without_heartbeat=False, without_mingle=True, without_gossip=True, task_events=True,
            loglevel=loglevel, ready_callback=None, timer_cls=_timer_of(app),
            # Several workers in one process must not share one event loop: on a real broker the
            # shared connection state corrupts (UnexpectedFrame).
            use_eventloop=False,
        )
        def run() -> None:
            # The solo pool runs tasks in this thread under Celery's current app, which is per thread.
            app.set_current()
            worker.start()

        thread = threading.Thread(target=run, name=f"worker:{hostname}", daemon=True)
        thread.start()
        # Queue selection is app-wide (app.amqp.queues.select): the next worker of the same app may
        # only select its queue after this one has built its consumer, or one would consume the other's.
        if not worker.ready.wait(timeout):
            raise RuntimeError(f"worker {hostname} did not start within {timeout:g} s")
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
