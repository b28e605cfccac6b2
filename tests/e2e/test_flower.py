"""Flower, the monitoring UI, shows the peers and their training tasks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import requests

from harness.waiting import wait_until
from settings import ROOT

pytestmark = pytest.mark.e2e

AUTH = ("admin", "flower-test-password")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def flower(platform, tmp_path):
    port = free_port()
    log = (tmp_path / "flower.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tasks.celery", "flower", "--address=127.0.0.1", f"--port={port}",
         f"--basic-auth={AUTH[0]}:{AUTH[1]}"],
        cwd=ROOT, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(base), 30, "Flower to answer")
        yield base
    finally:
        process.terminate()
        process.wait(20)
        log.close()


def _answers(base: str) -> bool:
    try:
        return requests.get(f"{base}/healthcheck", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def test_flower_shows_peers_and_their_training_tasks(platform, two_peers, digits_csv, flower):
    assert requests.get(f"{flower}/api/workers", timeout=10).status_code == 401

    # Peers take no remote-control commands (see docs/security.md), so Flower knows them from their
    # events: alive while their worker heartbeats arrive.
    def peers_listed():
        alive = requests.get(f"{flower}/api/workers", params={"status": 1}, auth=AUTH, timeout=20).json()
        found = {peer: [name for name, up in alive.items() if name.startswith(f"peer.{peer}@") and up]
                 for peer in two_peers}
        return alive if all(found.values()) else None

    wait_until(peers_listed, 30, "Flower to list the peer workers", interval=1)

    user = platform.user()
    hp = json.dumps({"learning_rate": 0.01, "epochs": 2, "hidden": [32]})
    session_id = user.start(digits_csv, num_peers=2, hyperparameters=hp).json()["session_id"]
    assert user.wait_finished(session_id, timeout=60)["status"] == "COMPLETED"

    def trained():
        tasks = requests.get(f"{flower}/api/tasks", params={"taskname": "peertrain.train"}, auth=AUTH,
                             timeout=10).json()
        mine = [t for t in tasks.values() if session_id in (t.get("args") or "")]
        return mine if len(mine) == 2 and all(t["state"] == "SUCCESS" for t in mine) else None

    tasks = wait_until(trained, 20, "Flower to show both training tasks", interval=0.5)
    assert sorted(t["routing_key"] for t in tasks) == sorted(f"peer.{p}" for p in two_peers)
    # The tasks' storage grants never reach the event exchange: Flower shows a summary instead.
    assert all("://" not in (t.get("args") or "") and "signature" not in (t.get("args") or "") for t in tasks)
    assert sorted(t["worker"].split("@")[0] for t in tasks) == sorted(f"peer.{p}" for p in two_peers)
