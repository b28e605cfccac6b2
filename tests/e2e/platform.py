"""The platform as separate pieces for end-to-end tests: real peer processes, an HTTP client, waiting."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from settings import ROOT


def sse(chunks: Iterable[bytes | str]) -> Iterator[dict[str, Any]]:
    """Server-Sent Events from a response's chunks, as {"id": int, "event": str, "data": object}; comments skipped."""
    buffer = ""
    for chunk in chunks:
        buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            fields: dict[str, str] = {}
            for line in block.split("\n"):
                if line and not line.startswith(":"):
                    name, _, value = line.partition(": ")
                    fields[name] = value
            if fields:
                yield {"id": int(fields["id"]), "event": fields["event"], "data": json.loads(fields["data"])}


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


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
            [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", f"peer.{name}", "-n", f"peer.{name}@%h",
             "-c", "1", "--loglevel=INFO", "--without-mingle", "--without-gossip"],
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
def make_target(target: str, env: dict[str, str], log: Path) -> Iterator[str]:
    """`make <target>` serving the API on a free port (env's PORT is set here); yields its base URL once
    /healthz answers 200, and stops the whole process group afterwards. Output goes to `log`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"DATA_DIR": str(log.parent / f"make-{target}-data"), **env}  # never the checkout's own var/
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
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
                raise AssertionError(f"make {target} did not stop within 30 s of SIGTERM") from None
    # make takes the SIGTERM too, and may report the stopped command as failed (2); a crash shows as a traceback.
    output = log.read_text()
    assert process.returncode in (0, 2, -signal.SIGTERM) and "Traceback" not in output, output[-3000:]


class Api:
    """A user of the REST API over real HTTP."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = requests.Session()

    def sign_up_and_in(self, username: str, password: str = "correct horse") -> Api:
        email = f"{username}@example.com"
        account = {"username": username, "email": email, "password": password}
        r = self.http.post(f"{self.base}/auth/signup", json=account)
        assert r.status_code == 201, r.text
        r = self.http.post(f"{self.base}/auth/signin", json={"email": email, "password": password})
        assert r.status_code == 200, r.text
        self.http.headers["Authorization"] = f"Bearer {r.json()['access_token']}"
        return self

    def get(self, path: str, **params: Any) -> requests.Response:
        return self.http.get(f"{self.base}{path}", params=params, timeout=30)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.http.post(f"{self.base}{path}", timeout=60, **kwargs)

    def start(self, csv: Path, **form: Any) -> requests.Response:
        with csv.open("rb") as f:
            return self.post("/sessions/start", files={"file": (csv.name, f, "text/csv")},
                             data={k: str(v) for k, v in form.items()})

    def session(self, session_id: str) -> dict[str, Any]:
        r = self.get(f"/sessions/{session_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_finished(self, session_id: str, timeout: float) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            session = self.session(session_id)
            return session if session["status"] not in ("PENDING", "RUNNING") else None

        return wait_until(finished, timeout, f"session {session_id} to finish", interval=0.2)

    def events(self, session_id: str, last_event_id: int | None = None) -> Iterator[dict[str, Any]]:
        """Follow the session's event stream until the server closes it (after `end`)."""
        headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
        with self.http.get(f"{self.base}/sessions/{session_id}/events", headers=headers, stream=True,
                           timeout=60) as r:
            assert r.status_code == 200, r.text
            assert r.headers["Content-Type"].startswith("text/event-stream")
            yield from sse(r.iter_content(chunk_size=None))

    def heartbeats(self, session_id: str, **query: Any) -> list[dict[str, Any]]:
        r = self.get(f"/sessions/{session_id}/heartbeats", page_size=1000, **query)
        assert r.status_code == 200, r.text
        return r.json()["items"]
