"""A contributed machine's side of `peertrain peer join` and `peertrain peer run`: the peer file and the worker.

`join` keeps what the platform gave for the join token (the peer's name, its own broker login and the worker
command) in `peer.env` in the config directory, mode 0600; `run` starts the peer worker in the foreground with
exactly that environment, replacing this process, so Ctrl-C reaches the worker itself (a clean, warm
shutdown: the task in hand is given back to the broker) and nothing is left running behind it.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from client.credentials import config_dir

# The start of every worker command the platform gives (tasks/protocol.py worker_command); nothing else is run.
WORKER = ["celery", "-A", "tasks.peer", "worker"]
NAME, COMMAND, URL = "PEER_NAME", "PEER_COMMAND", "PEERTRAIN_URL"


class PeerFileError(Exception):
    """The peer file is missing or not one `peertrain peer join` wrote."""


def default_path() -> Path:
    return config_dir() / "peer.env"


def write(path: Path, url: str, joined: dict[str, Any]) -> None:
    """Keep a joined peer's environment, readable by this user only (it holds the peer's broker password)."""
    lines = {NAME: joined["name"], URL: url, COMMAND: joined["command"], **joined["environment"]}
    text = "".join(f"{key}={value}\n" for key, value in lines.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written to a private temporary file and renamed: never a moment where the password is readable by others.
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".peer-", suffix=".env")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read(path: Path) -> dict[str, str]:
    if not path.exists():
        raise PeerFileError(f"{path} does not exist: run `peertrain peer join --url URL --token TOKEN` first")
    values = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    missing = [key for key in (NAME, COMMAND, "BROKER_URL") if not values.get(key)]
    if missing:
        raise PeerFileError(f"{path} lacks {', '.join(missing)}: join again with a new token")
    return values


def worker_argv(command: str) -> list[str]:
    """The worker's command line, run with this Python; only a peer worker command is accepted."""
    argv = shlex.split(command)
    if argv[:len(WORKER)] != WORKER:
        raise PeerFileError(f"not a peer worker command: {command!r}")
    return [sys.executable, "-m", "celery", *argv[1:]]


def installed() -> bool:
    """Whether the peer side (the `train` task, Celery and torch) is installed here."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in ("celery", "torch", "tasks.peer"))
    except ModuleNotFoundError:  # no `tasks` package at all
        return False


def run(path: Path) -> None:
    """Become the peer worker (never returns)."""
    values = read(path)
    argv = worker_argv(values.pop(COMMAND))
    values.pop(NAME)
    values.pop(URL, None)
    if not installed():
        raise PeerFileError("the peer side is not installed here: pip install 'peertrain[peer]' "
                            "(from the platform's checkout; see the README)")
    environment = {**os.environ, **values}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, environment)
