"""The peertrain API over HTTP (httpx): its routes as methods, its errors as `ApiError`, its event stream."""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Iterator
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


class Refreshing(httpx.Auth):
    """A bearer token that renews itself: when the server refuses the access token, the refresh token gets a new
    one (`POST /auth/refresh`, handed to `renewed`) and the request goes again, once. A session longer than an
    access token's life is followed to its end."""

    def __init__(self, url: str, token: str, refresh: str, renewed: Callable[[dict[str, Any]], None]) -> None:
        self.refresh_url = f"{url}/auth/refresh"
        self.token, self.refresh, self.renewed = token, refresh, renewed

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.token}"
        response = yield request
        if response.status_code != 401 or not self.refresh:
            return
        renewal = yield self.renewal()
        if renewal.status_code == 200:  # otherwise its answer is the one to show: the sign-in expired
            request.headers["Authorization"] = f"Bearer {self.take(renewal)}"
            yield request

    def renewal(self) -> httpx.Request:
        return httpx.Request("POST", self.refresh_url, headers={"Authorization": f"Bearer {self.refresh}"})

    def take(self, renewal: httpx.Response) -> str:
        answer = json.loads(renewal.read())
        self.token = answer["access_token"]
        self.renewed(answer)
        return self.token


class Api:
    """One API server, as one user (when given a token; with a refresh token too, one that renews itself)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0, refresh: str = "",
                 renewed: Callable[[dict[str, Any]], None] = lambda answer: None) -> None:
        self.url = url.rstrip("/")
        self.auth = Refreshing(self.url, token, refresh, renewed) if token else None
        self.http = httpx.Client(base_url=self.url, auth=self.auth, timeout=timeout)

    def renew(self) -> None:
        """Get a new access token now (the one held is known to have expired); ApiError if the sign-in expired."""
        assert self.auth is not None
        renewal = self.http.send(self.auth.renewal(), auth=None)
        if renewal.is_error:
            renewal.read()
            raise ApiError.from_response(renewal)
        self.auth.take(renewal)

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.is_error:
            raise ApiError.from_response(response)
        return response.json() if response.content else {}

    def signup(self, username: str, email: str, password: str) -> dict[str, Any]:
        return self._call("POST", "/auth/signup", json={"username": username, "email": email, "password": password})

    def signin(self, email: str, password: str) -> dict[str, Any]:
        return self._call("POST", "/auth/signin", json={"email": email, "password": password})

    def peers(self) -> dict[str, Any]:
        return self._call("GET", "/peers")

    def enrol(self, name: str) -> dict[str, Any]:
        return self._call("POST", "/peers", json={"name": name})

    def join(self, token: str) -> dict[str, Any]:
        return self._call("POST", "/join", json={"token": token})

    def peer(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/peers/{name}")

    def change_peer(self, name: str, **fields: bool) -> dict[str, Any]:
        return self._call("PATCH", f"/peers/{name}", json=fields)

    def remove_peer(self, name: str) -> None:
        self._call("DELETE", f"/peers/{name}")

    def pools(self) -> dict[str, Any]:
        return self._call("GET", "/pools")

    def create_pool(self, name: str, members: list[str], peers: list[str]) -> dict[str, Any]:
        return self._call("POST", "/pools", json={"name": name, "members": members, "peers": peers})

    def delete_pool(self, name: str) -> None:
        self._call("DELETE", f"/pools/{name}")

    def start(self, csv: Path, form: dict[str, str]) -> dict[str, Any]:
        with csv.open("rb") as file:
            return self._call("POST", "/sessions/start", data=form, files={"file": (csv.name, file, "text/csv")})

    def sessions(self) -> dict[str, Any]:
        return self._call("GET", "/sessions")

    def session(self, session_id: str) -> dict[str, Any]:
        return self._call("GET", f"/sessions/{session_id}")

    def trials(self, session_id: str) -> dict[str, Any]:
        return self._call("GET", f"/sessions/{session_id}/trials")

    def cancel(self, session_id: str) -> dict[str, Any]:
        return self._call("POST", f"/sessions/{session_id}/cancel")

    def resume(self, session_id: str) -> dict[str, Any]:
        return self._call("POST", f"/sessions/{session_id}/resume")

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
