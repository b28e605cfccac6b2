"""In-process workers (make run's, and the end-to-end tests'): a task retried with a countdown runs again."""

from __future__ import annotations

import threading

from celery import Celery

from tasks.inprocess import InProcessWorkers


def test_a_task_retried_with_a_countdown_runs_again_in_its_own_app():
    # Not the current app of any thread: only the worker's own threads may find its tasks.
    app = Celery("inprocess-retry", broker="memory://", backend="cache+memory://", set_as_current=False)
    tries: list[int] = []
    done = threading.Event()

    @app.task(bind=True, name="inprocess.flaky", max_retries=3, shared=False)  # as the coordinator's tasks
    def flaky(self):
        tries.append(self.request.retries)
        if len(tries) < 2:
            raise self.retry(countdown=0.2)  # an ETA: the worker's timer thread hands it back
        done.set()

    workers = InProcessWorkers()
    workers.start(app, "celery", "inprocess-retry@test")
    try:
        flaky.apply_async(queue="celery")
        assert done.wait(15), f"the retry never ran (tries: {tries})"
        assert tries == [0, 1]
    finally:
        workers.stop()
