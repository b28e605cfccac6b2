"""The peertrain API over HTTP (httpx): its routes as methods, its errors as `ApiError`, its event stream."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx
from httpx_sse import connect_sse

# The server sends a keep-alive comment every 15 s: a silence four times as long is a dead connection.
STREAM_TIMEOUT = httpx.Timeout(10.0, read=60.0)


class ApiError(Exception):
    """The API refused or failed a request; `message` and `errors` are its own words."""

    def __init__(self, status: int, message: str, errors: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors or {}

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        try:
            body = response.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        message = body.get("message") or f"{response.status_code} {response.reason_phrase}"
        return cls(response.status_code, message, body.get("errors"))


@dataclass
class Event:
    """One event of a session's stream."""

    type: str
    id: str | None
    data: dict[str, Any]


class Api:
    """One API server, as one user (when given a token)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.is_error:
            raise ApiError.from_response(response)
        return response.json()

    def signup(self, username: str, email: str, password: str) -> dict[str, Any]:
        return self._call("POST", "/auth/signup", json={"username": username, "email": email, "password": password})

    def signin(self, email: str, password: str) -> dict[str, Any]:
        return self._call("POST", "/auth/signin", json={"email": email, "password": password})

    def peers(self) -> dict[str, Any]:
        return self._call("GET", "/peers")

    def start(self, csv: Path, form: dict[str, str]) -> dict[str, Any]:
        with csv.open("rb") as file:
            return self._call("POST", "/sessions/start", data=form, files={"file": (csv.name, file, "text/csv")})

    def sessions(self) -> dict[str, Any]:
        return self._call("GET", "/sessions")

    def session(self, session_id: str) -> dict[str, Any]:
        return self._call("GET", f"/sessions/{session_id}")

    def cancel(self, session_id: str) -> dict[str, Any]:
        return self._call("POST", f"/sessions/{session_id}/cancel")

    def model(self, session_id: str, out: BinaryIO, round_: int | None = None) -> int:
        """Write the session's model (or a federated session's global model after round `round_`) to `out`;
        returns its size in bytes."""
        params = {} if round_ is None else {"round": round_}
        with self.http.stream("GET", f"/sessions/{session_id}/model", params=params) as response:
            if response.is_error:
                response.read()
                raise ApiError.from_response(response)
            size = 0
            for chunk in response.iter_bytes(1 << 20):
                size += out.write(chunk)
            return size

    def events(self, session_id: str, last_id: str | None = None) -> Iterator[Event]:
        """The session's events from the start, or after `last_id`, until the server closes the stream."""
        headers = {"Last-Event-ID": last_id} if last_id is not None else {}
        with connect_sse(self.http, "GET", f"/sessions/{session_id}/events", headers=headers,
                         timeout=STREAM_TIMEOUT) as source:
            if source.response.is_error:
                source.response.read()
                raise ApiError.from_response(source.response)
            for sse in source.iter_sse():
                yield Event(sse.event, sse.id or None, json.loads(sse.data) if sse.data else {})
