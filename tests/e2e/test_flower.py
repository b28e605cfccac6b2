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


def test_make_run_serves_flower_showing_its_local_peers_and_their_tasks(tmp_path, browser):
    from harness.http import Api
    from harness.processes import free_port, make_target
    from tests.e2e.browsing import LAPTOP, Visit

    env = {k: v for k, v in os.environ.items()
           if k not in ("BROKER_URL", "RESULT_BACKEND", "MONGODB_URI", "STORAGE_URL", "S3_ENDPOINT_URL",
                        "COORDINATOR_QUEUE", "MONITOR_QUEUE", "JWT_SECRET_KEY", "PEERTRAIN_ENV")}
    flower_port = free_port()
    env.update(STORAGE_URL=str(tmp_path / "storage"), LOCAL_PEERS="2", FLOWER_PORT=str(flower_port))
    log = tmp_path / "make-run.log"
    with make_target("run", env, log) as base:
        flower = f"http://127.0.0.1:{flower_port}"
        assert f"Flower     {flower}/" in log.read_text()  # the banner says where
        user = Api(base).sign_up_and_in("ann")
        wait_until(lambda: user.get("/peers").json()["online"] == 2, 30, "the two local peers")
        hp = json.dumps({"learning_rate": 0.01, "epochs": 3})
        session_id = user.start(ROOT / "samples" / "wine.csv", num_peers=2, hyperparameters=hp).json()["session_id"]
        assert user.wait_finished(session_id, timeout=60)["status"] == "COMPLETED"

        visit = Visit(browser, flower, LAPTOP)
        page = visit.page
        try:
            # The local peers, online, as their own workers' events show them.
            page.goto(f"{flower}/workers")
            page.wait_for_selector("#workers-table tbody tr:has-text('peer.local2@')")  # the table loads itself
            rows = "".join(page.inner_text("#workers-table tbody").split())  # a narrow column wraps the names
            assert "peer.local1@" in rows and "peer.local2@" in rows and rows.count("Online") == 2, rows
            # Their training tasks, each with its summary (never the grants it carries) and its outcome.
            page.goto(f"{flower}/tasks")

            def listed() -> str | None:
                page.reload()
                text = page.inner_text("#tasks-table tbody") if page.query_selector("#tasks-table tbody tr") else ""
                return text if text.count(session_id) == 2 and text.count("SUCCESS") >= 2 else None

            tasks = wait_until(listed, 30, "Flower to list both training tasks", interval=1)
            assert "peertrain.train" in tasks and "signature" not in tasks and "://" not in tasks
            visit.shot("flower-1-tasks")
            visit.check()
        finally:
            visit.close()
