"""Broker logins for peers, through RabbitMQ's management HTTP API (the `rabbitmq_management` plugin).

Each registered peer gets a user of its own with permissions limited to its own queues and the two
exchanges it reports on (tasks/protocol.py `permissions`); removing the peer deletes the user and
closes its connections at once.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from kombu import Connection

from settings import Settings

log = logging.getLogger(__name__)


class BrokerAdminError(RuntimeError):
    """The management API refused or could not be reached."""


class BrokerAdmin:
    """The few management API calls the peer registry needs, on one virtual host."""

    def __init__(self, url: str, vhost: str, ca_file: str = "", timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        self.base = urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))
        self.auth = base64.b64encode(f"{parts.username or ''}:{parts.password or ''}".encode()).decode()
        self.vhost = vhost
        self.timeout = timeout
        self.context = ssl.create_default_context(cafile=ca_file or None) if parts.scheme == "https" else None

    @classmethod
    def from_settings(cls, settings: Settings) -> BrokerAdmin:
        broker = Connection(settings.broker_url)
        url = settings.broker_admin_url or (
            f"http://{quote(broker.userid or 'guest', safe='')}:{quote(broker.password or 'guest', safe='')}"
            f"@{broker.hostname}:15672")
        return cls(url, broker.virtual_host or "/", settings.broker_ca_file)

    def _call(self, method: str, path: str, body: Any = None, reason: str | None = None) -> Any:
        request = urllib.request.Request(
            f"{self.base.rstrip('/')}/api/{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Basic {self.auth}", "Content-Type": "application/json",
                     **({"X-Reason": reason} if reason else {})})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self.context) as response:
                text = response.read()
        except urllib.error.HTTPError as exc:
            if method == "DELETE" and exc.code == 404:
                return None
            raise BrokerAdminError(f"RabbitMQ's management API answered {exc.code} to {method} /api/{path}: "
                                   f"{exc.read()[:300].decode(errors='replace')}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise BrokerAdminError(f"RabbitMQ's management API at {self.base} cannot be reached "
                                   f"({getattr(exc, 'reason', exc)}); is the rabbitmq_management plugin on, "
                                   "and BROKER_ADMIN_URL right?") from None
        return json.loads(text) if text else None

    def _v(self) -> str:
        return quote(self.vhost, safe="")

    def add_user(self, user: str, password: str, permissions: dict[str, str], max_connections: int = 8,
                 max_channels: int = 64) -> None:
        """A user with these rights on this virtual host, and caps on what it may open (one peer needs ~3)."""
        name = quote(user, safe="")
        self._call("PUT", f"users/{name}", {"password": password, "tags": ""})
        self._call("PUT", f"permissions/{self._v()}/{name}", permissions)
        self._call("PUT", f"user-limits/{name}/max-connections", {"value": max_connections})
        self._call("PUT", f"user-limits/{name}/max-channels", {"value": max_channels})

    def remove_user(self, user: str) -> None:
        """Delete `user` and close every connection it holds."""
        self._call("DELETE", f"users/{quote(user, safe='')}")
        for name in self._connections_of(user):
            try:
                self._call("DELETE", f"connections/{quote(name, safe='')}", reason="peer removed from peertrain")
            except BrokerAdminError as exc:
                # RabbitMQ closes a deleted user's connections itself (CONNECTION_FORCED), but its listing lags
                # by seconds: a connection already closing is still listed, and deleting it answers 500.
                log.info("connection %s of removed user %s was closing already: %s", name, user, exc)

    def _connections_of(self, user: str) -> list[str]:
        return [connection["name"] for connection in self._call("GET", "connections?columns=name,user") or []
                if connection.get("user") == user]

    def consumers(self) -> set[tuple[str, str]]:
        """(queue, user) of every consumer on this virtual host, as the broker itself sees them (a consumer
        shows here a second or two after it starts consuming, and is gone as soon as it stops)."""
        rows = self._call("GET", f"consumers/{self._v()}?columns=queue.name,channel_details.user") or []
        return {(row["queue"]["name"], row["channel_details"]["user"]) for row in rows
                if isinstance(row.get("channel_details"), dict) and "user" in row["channel_details"]}

    def add_vhost(self, vhost: str, user: str) -> None:
        """Create a virtual host and give `user` every right on it (tests, and first-time setup)."""
        self._call("PUT", f"vhosts/{quote(vhost, safe='')}", {})
        self._call("PUT", f"permissions/{quote(vhost, safe='')}/{quote(user, safe='')}",
                   {"configure": ".*", "write": ".*", "read": ".*"})

    def remove_vhost(self, vhost: str) -> None:
        self._call("DELETE", f"vhosts/{quote(vhost, safe='')}")
