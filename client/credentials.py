"""The access tokens the CLI keeps, one per API address, in the user's config directory (mode 0600)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

DEFAULT_URL = "http://127.0.0.1:8000"


def config_dir() -> Path:
    """$XDG_CONFIG_HOME/peertrain (~/.config/peertrain), or the platform's equivalent."""
    return Path(click.get_app_dir("peertrain"))


@dataclass
class Login:
    token: str
    username: str
    email: str
    expires_at: float
    refresh: str = ""  # gets new access tokens until `refresh_expires_at` (none in files written before)
    refresh_expires_at: float = 0.0

    @property
    def expired(self) -> bool:
        return time.time() >= self.expires_at

    @property
    def signed_out(self) -> bool:
        """Neither token works any more: the user signs in again."""
        return self.expired and time.time() >= self.refresh_expires_at

    def renewed(self, answer: dict) -> None:
        self.token, self.expires_at = answer["access_token"], time.time() + answer["expires_in"]


class Credentials:
    """`credentials.json`: the API address last used and a login per address."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or config_dir() / "credentials.json"
        self.data: dict[str, Any] = {"url": None, "logins": {}}
        if self.path.exists():
            try:
                self.data.update(json.loads(self.path.read_text()))
            except (OSError, ValueError):
                pass  # an unreadable file holds no login: signing in again rewrites it

    @property
    def url(self) -> str:
        """The address to use when none is given: the last one signed in to."""
        return self.data.get("url") or DEFAULT_URL

    def login(self, url: str) -> Login | None:
        saved = self.data["logins"].get(url)
        return Login(**saved) if saved else None

    def save(self, url: str, login: Login) -> None:
        self.data["url"] = url
        self.data["logins"][url] = asdict(login)
        self._write()

    def forget(self, url: str) -> bool:
        found = self.data["logins"].pop(url, None) is not None
        self._write()
        return found

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Written whole to a private temporary file, then renamed: never readable by others, never half-written.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".credentials-")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(self.data, out, indent=2)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise
