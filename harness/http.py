"""A user of the REST API over real HTTP, and its event streams."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import requests

from harness.waiting import wait_until


def sse(chunks: Iterable[bytes | str]) -> Iterator[dict[str, Any]]:
    """Server-Sent Events from a response's chunks, as {"id": int | None, "event": str, "data": object}; comments
    skipped."""
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
                yield {"id": int(fields["id"]) if "id" in fields else None, "event": fields["event"],
                       "data": json.loads(fields["data"])}


class Api:
    """A user of the REST API over real HTTP."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = requests.Session()
        self.refresh_token = ""
        self.http.hooks["response"].append(self._renew)

    def _renew(self, response: requests.Response, **kwargs: Any) -> requests.Response:
        """An access token refused as expired is renewed with the refresh token and the request sent again, as
        the CLI and the dashboard do: a bench or test may outlive an access token."""
        if response.status_code != 401 or not self.refresh_token or "expired" not in response.text \
                or response.request.url.endswith("/auth/refresh"):
            return response
        renewal = self.http.post(f"{self.base}/auth/refresh", timeout=30,
                                 headers={"Authorization": f"Bearer {self.refresh_token}"})
        if renewal.status_code != 200:
            return response
        self.http.headers["Authorization"] = f"Bearer {renewal.json()['access_token']}"
        again = response.request.copy()
        again.headers["Authorization"] = self.http.headers["Authorization"]
        return self.http.send(again, **kwargs)

    def sign_up_and_in(self, username: str, password: str = "correct horse") -> Api:
        email = f"{username}@example.com"
        account = {"username": username, "email": email, "password": password}
        r = self.http.post(f"{self.base}/auth/signup", json=account)
        assert r.status_code == 201, r.text
        r = self.http.post(f"{self.base}/auth/signin", json={"email": email, "password": password})
        assert r.status_code == 200, r.text
        self.http.headers["Authorization"] = f"Bearer {r.json()['access_token']}"
        self.email, self.refresh_token = email, r.json()["refresh_token"]
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
