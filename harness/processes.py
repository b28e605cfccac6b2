"""The platform's pieces as separate processes: peers as their owners start them, `make run` and `make api`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from harness.waiting import free_port, wait_until
from settings import ROOT
from tasks import protocol

# What only the platform's own processes hold; a peer machine gets none of it.
PLATFORM_ONLY = ("BROKER_", "RESULT_", "MONGODB_", "STORAGE_", "S3_", "AWS_", "JWT_")


def peer_environment(**enrolment: str) -> dict[str, str]:
    """A peer machine's environment: what its registration printed (its own broker login), nothing else."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(PLATFORM_ONLY)}
    env.update(enrolment)
    return env


class PeerProcess:
    """A peer as its owner starts one: the command `python -m tasks.registry add` prints."""

    def __init__(self, name: str, log_dir: Path, env: dict[str, str], app: str = "tasks.peer") -> None:
        self.name = name
        self.log_path = log_dir / f"peer-{name}.log"
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", protocol.task_queue(name),
             "-n", protocol.worker_name(name), "-c", "1", "--loglevel=INFO", "--without-mingle", "--without-gossip"],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def kill(self) -> None:
        """Pull the plug: SIGKILL the worker and its pool child, so no worker-offline event is sent."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self._log.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def make_target(target: str, env: dict[str, str], log: Path, port: int | None = None) -> Iterator[str]:
    """`make <target>` serving the API on `port` (default: a free one; env's PORT is set here); yields its base
    URL once /healthz answers 200, and stops the whole process group afterwards. Output goes to `log`."""
    port = port or free_port()
    # Never the checkout's own var/, nor the Flower port of a make run the developer has open.
    env = {"DATA_DIR": str(log.parent / f"make-{target}-data"), "FLOWER_PORT": str(free_port()), **env}
    with log.open("wb") as out:
        process = subprocess.Popen(["make", target], cwd=ROOT, env={**env, "PORT": str(port)}, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            def healthy() -> bool:
                assert process.poll() is None, log.read_text()
                try:
                    return requests.get(f"{base}/healthz", timeout=2).status_code == 200
                except requests.ConnectionError:
                    return False

            wait_until(healthy, 60, f"make {target} to serve the API", interval=0.25)
            yield base
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                # Every thread's stack of each of its processes, into the log (embedded.py registers SIGUSR2).
                os.killpg(process.pid, signal.SIGUSR2)
                with contextlib.suppress(AssertionError):
                    wait_until(lambda: "most recent call first" in log.read_text(), 3, "the stacks", interval=0.1)
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
                raise AssertionError(f"make {target} did not stop within 30 s of SIGTERM; the end of its log, "
                                     f"stacks included:\n{log.read_text()[-6000:]}") from None
    # make takes the SIGTERM too, and may report the stopped command as failed (2); a crash shows as a traceback.
    output = log.read_text()
    assert process.returncode in (0, 2, -signal.SIGTERM) and "Traceback" not in output, output[-3000:]


