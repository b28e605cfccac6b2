"""`make run` on a fresh checkout: the whole platform in one process, a session completes over HTTP."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import pytest

from harness.http import Api
from harness.processes import make_target
from harness.waiting import wait_until
from settings import ROOT
from tasks import protocol

pytestmark = pytest.mark.e2e


def test_make_run_serves_a_session_on_the_sample_csv(tmp_path):
    # Only the embedded defaults: none of the test run's service URLs leak in.
    env = {k: v for k, v in os.environ.items()
           if k not in ("BROKER_URL", "RESULT_BACKEND", "MONGODB_URI", "STORAGE_URL", "S3_ENDPOINT_URL",
                        "COORDINATOR_QUEUE", "MONITOR_QUEUE", "JWT_SECRET_KEY", "PEERTRAIN_ENV")}
    env.update(STORAGE_URL=str(tmp_path / "storage"), LOCAL_PEERS="2")
    log = tmp_path / "make-run.log"
    with make_target("run", env, log) as base:
        user = Api(base).sign_up_and_in("ann")
        wait_until(lambda: user.get("/peers").json()["online"] == 2, 20, "the two local peers")
        hp = json.dumps([{"learning_rate": 0.01, "epochs": 20}, {"learning_rate": 0.001, "epochs": 20}])
        response = user.start(ROOT / "samples" / "wine.csv", num_peers=2, hyperparameters=hp)
        assert response.status_code == 202, response.text
        # Followed live through granian's ASGI path, from the start to the end.
        stream = list(user.events(response.json()["session_id"]))
        assert [e["event"] for e in stream].count("heartbeat") == 40 and stream[-1]["event"] == "end"
        assert [e["id"] for e in stream] == list(range(1, len(stream) + 1))
        session = user.wait_finished(response.json()["session_id"], timeout=60)
        assert session["status"] == "COMPLETED", session
        assert session["results"]["best_value"] > 0.8
        assert len(user.heartbeats(session["id"])) == 40
        assert user.get(f"/sessions/{session['id']}/model").content[:8]
        banner = log.read_text()
        assert f"{base}/docs" in banner and "curl" in banner
        assert f"{base}/ " in banner and "peertrain start" in banner
        # A quiet console: a line per session event (its start with its dashboard link, its end), not Celery's
        # line per task with its whole result.
        session_id = session["id"]
        assert f"session {session_id} started by ann: sweep on " in banner
        assert f"follow it at {base}/#/sessions/{session_id}" in banner
        assert f"session {session_id} COMPLETED" in banner
        assert "celery.app.trace" not in banner and "succeeded in" not in banner
        assert "<title>peertrain</title>" in user.get("/").text  # the dashboard, served by granian too
        # No other machine can reach the in-process broker: enrolling one is refused, saying what to do.
        refused = user.post("/peers", json={"name": "laptop"})
        assert refused.status_code == 409 and "BROKER_URL" in refused.json()["message"]


def running_with(marker: str) -> list[int]:
    """Processes whose environment holds `marker` (this test's DATA_DIR): make run and everything it started."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as environ:
                    if marker.encode() in environ.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("broker", ["memory", "rabbitmq"])
def test_make_run_stopped_mid_session_leaves_nothing_running_and_keeps_its_data(tmp_path, broker, record_property):
    import signal
    import threading
    import time

    import requests

    from tests import conftest, services

    env = {k: v for k, v in os.environ.items()
           if k not in ("BROKER_URL", "RESULT_BACKEND", "MONGODB_URI", "STORAGE_URL", "S3_ENDPOINT_URL",
                        "COORDINATOR_QUEUE", "MONITOR_QUEUE", "JWT_SECRET_KEY", "PEERTRAIN_ENV")}
    data = tmp_path / "kept"
    env.update(STORAGE_URL=str(tmp_path / "storage"), LOCAL_PEERS="2", DATA_DIR=str(data), CHECKPOINT_EPOCHS="2")
    if broker == "rabbitmq":  # the peers as `celery worker` processes with logins of their own
        services.require(conftest.REAL_BROKER, "RabbitMQ (with its management plugin) and Redis")
        env.update(BROKER_URL=os.environ["BROKER_URL"], RESULT_BACKEND=os.environ["RESULT_BACKEND"],
                   COORDINATOR_QUEUE=f"mr-{conftest.RUN_ID}.coordinator", MONITOR_QUEUE=f"mr-{conftest.RUN_ID}.monitor",
                   RESULTS_QUEUE=f"mr-{conftest.RUN_ID}.results", EVENT_EXCHANGE=f"mr-{conftest.RUN_ID}.events")
    port = rabbit_free_port()
    base = f"http://127.0.0.1:{port}"

    def make_run(log):
        return started_make_run(env, port, log)

    with (tmp_path / "first.log").open("wb") as log:
        process = make_run(log)
        user = Api(base).sign_up_and_in("ann")
        wait_until(lambda: user.get("/peers").json()["free"] == 2, 60, "the two local peers")
        if broker == "rabbitmq":  # with a broker, the embedded platform's API enrols machines itself
            name = f"mr{conftest.RUN_ID}"
            token = user.post("/peers", json={"name": name}).json()["join_token"]
            joined = user.post("/join", json={"token": token})
            assert joined.status_code == 200 and joined.json()["environment"]["BROKER_URL"].startswith("amqp://")
            conftest.PEER_USERS.append(protocol.broker_user(name, conftest.VHOST))
        long = json.dumps({"learning_rate": 0.001, "epochs": 1000})
        session_id = user.start(ROOT / "samples" / "wine.csv", num_peers=2, hyperparameters=long).json()["session_id"]
        wait_until(lambda: len(user.heartbeats(session_id)) >= 12, 60, "both peers to be training")
        assert len(running_with(str(data))) >= (2 if broker == "memory" else 4)  # make, python, granian (+peers)
        # A stream open on the session, as a dashboard tab or `curl -sN .../events` holds one.
        seen: list[str] = []
        following = threading.Thread(target=lambda: seen.extend(e["event"] for e in user.events(session_id)),
                                     daemon=True)
        following.start()
        wait_until(lambda: "heartbeat" in seen, 30, "the stream to deliver")
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole foreground group
        stopped = time.monotonic()
        status = process.wait(25)
        record_property("seconds from Ctrl-C to make run's exit, a stream open", round(time.monotonic() - stopped, 2))
    wait_until(lambda: not running_with(str(data)), 20 - (time.monotonic() - stopped), "every process to be gone")
    assert status in (130, -signal.SIGINT), status  # make itself ends by the interrupt, as the shell expects
    output = (tmp_path / "first.log").read_text()
    # ... and says nothing of it: make run stopped cleanly.
    assert "make: ***" not in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "refused to gracefully stop" not in output, output[-3000:]
    assert "kept" in output
    following.join(10)
    assert seen[-1] == "stopping", seen[-5:]  # the stream was told, then closed by the server

    # Started again: the user, their token and the interrupted session are still there, and it goes on.
    with (tmp_path / "second.log").open("wb") as log:
        process = make_run(log)
        try:
            session = user.session(session_id)
            assert session["status"] == "INTERRUPTED" and session["reason"] == "make run was stopped", session
            account = {"email": "ann@example.com", "password": "correct horse"}
            assert requests.post(f"{base}/auth/signin", json=account).status_code == 200  # and signs in again
            assert f"1 session(s) were interrupted ({session_id})" in (tmp_path / "second.log").read_text()
            assert {p["status"] for p in session["peers"]} == {"INTERRUPTED"}  # nobody's fault
            done = {p["name"]: max(b["epoch"] for b in user.heartbeats(session_id, peer=p["name"]))
                    for p in session["peers"]}
            assert min(done.values()) >= 6
            wait_until(lambda: user.get("/peers").json()["free"] == 2, 60, "the peers, free again")
            last = list(user.events(session_id))[-1]["id"]  # the interruption's end
            began = time.monotonic()
            answer = user.post(f"/sessions/{session_id}/resume")
            assert answer.status_code == 202 and answer.json()["status"] == "PENDING", answer.text
            assert user.post(f"/sessions/{session_id}/resume").status_code == 409  # once
            resumed = user.wait_finished(session_id, timeout=180)
            record_property("seconds for the resumed session to end", round(time.monotonic() - began, 2))
            assert resumed["status"] == "COMPLETED" and resumed["resumes"] == 1, resumed
            # Each peer went on from its last checkpoint (every 2 epochs), not from its first epoch.
            output = (tmp_path / "second.log").read_text()
            for name, reached in done.items():
                went_on = re.search(rf"peer {name} goes on from epoch (\d+) \(its checkpoint\)", output)
                assert went_on, output[-3000:]
                first = int(went_on[1])
                assert 1 < first <= reached + 1 and (first - 1) % 2 == 0, (name, first, reached)
                epochs = [b["epoch"] for b in user.heartbeats(session_id, peer=name)]
                assert sorted(epochs) == list(range(1, 1001)), name  # every epoch once
            # The stream goes on after the interruption's end: the resumption, then each epoch once, to the end.
            after = list(user.events(session_id, last_event_id=last))
            assert any(e["event"] == "status" and e["data"]["reason"] == "resumed" for e in after)
            beats = [(e["data"]["peer"], e["data"]["epoch"]) for e in after if e["event"] == "heartbeat"]
            assert len(beats) == len(set(beats)) and after[-1]["data"]["status"] == "COMPLETED"
            assert resumed["results"]["best_value"] > 0.5
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(25)
    assert "Traceback" not in (tmp_path / "second.log").read_text()


def rabbit_free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kept_as_shown(shown: list[dict], now: list[dict]) -> bool:
    """Every round `shown` is in `now`, in place, as it was shown; a round shown before its held-out measures (the
    next round goes out first: `SyncFederated.measure`) may have them now, and nothing else may differ."""

    def rest(round_: dict) -> dict:
        return {k: v for k, v in round_.items() if k != "metrics"}

    def measured_later(before: dict, after: dict) -> bool:
        added = after["metrics"].keys() - before["metrics"].keys()
        return (rest(after) == rest(before) and before["metrics"].items() <= after["metrics"].items()
                and (not added or "val_loss" not in before["metrics"]) and all(k.startswith("val_") for k in added))

    return len(now) >= len(shown) and all(map(measured_later, shown, now))


def test_make_run_killed_mid_federated_session_loses_no_round_and_resumes_by_itself(tmp_path, record_property):
    """kill -9 of the whole `make run` (as a power cut would): what was written a second before is all there after
    the restart, and with RESUME=auto the session goes on from its last round to COMPLETED."""
    import signal
    import time

    import requests

    env = {k: v for k, v in os.environ.items()
           if k not in ("BROKER_URL", "RESULT_BACKEND", "MONGODB_URI", "STORAGE_URL", "S3_ENDPOINT_URL",
                        "COORDINATOR_QUEUE", "MONITOR_QUEUE", "JWT_SECRET_KEY", "PEERTRAIN_ENV")}
    data = tmp_path / "kept"
    env.update(STORAGE_URL=str(tmp_path / "storage"), LOCAL_PEERS="2", DATA_DIR=str(data), SNAPSHOT_SECONDS="1")
    port = rabbit_free_port()
    base = f"http://127.0.0.1:{port}"

    def make_run(log, **extra):
        return started_make_run({**env, **extra}, port, log)

    rounds = 30
    with (tmp_path / "first.log").open("wb") as log:
        process = make_run(log)
        user = Api(base).sign_up_and_in("ann")
        wait_until(lambda: user.get("/peers").json()["free"] == 2, 60, "the two local peers")
        form = {"num_peers": 2, "mode": "federated", "rounds": rounds, "local_epochs": 25,
                "hyperparameters": json.dumps({"learning_rate": 0.003, "batch_size": 16, "hidden": [64]})}
        response = user.start(ROOT / "samples" / "wine.csv", **form)
        assert response.status_code == 202, response.text
        session_id = response.json()["session_id"]
        wait_until(lambda: len(user.session(session_id)["rounds"]) >= 3, 120, "three rounds")
        # What the API showed at least 1.5 s before the kill must survive it (SNAPSHOT_SECONDS=1).
        seen, shown_at = user.session(session_id)["rounds"], time.monotonic()
        wait_until(lambda: time.monotonic() - shown_at >= 1.5, 5, "a second and a half")
        assert len(user.session(session_id)["rounds"]) < rounds, "the session ended before the kill"
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    wait_until(lambda: not running_with(str(data)), 20, "every process to be gone")

    with (tmp_path / "second.log").open("wb") as log:
        process = make_run(log, RESUME="auto")
        try:
            again = user  # the same token: its secret was kept with the data
            session = again.session(session_id)
            kept = session["rounds"]
            assert kept_as_shown(seen, kept), ("rounds shown before the kill are gone or changed", seen, kept)
            assert session["status"] in ("INTERRUPTED", "PENDING", "RUNNING"), session
            began = time.monotonic()
            done = again.wait_finished(session_id, timeout=300)
            record_property("seconds for the resumed federated session to end", round(time.monotonic() - began, 2))
            assert done["status"] == "COMPLETED" and done["resumes"] == 1, done
            assert [r["round"] for r in done["rounds"]] == list(range(rounds))  # none lost, none run twice
            assert kept_as_shown(kept, done["rounds"]), (kept, done["rounds"])  # the earlier rounds intact
            # The rounds after it trained for real: no peer stopped by the interruption's stop notices (screening
            # may still refuse an honest update now and then: that is its job, not this test's).
            assert all(r["peers"] for r in done["rounds"]), [r["rejected"] for r in done["rounds"]]
            assert not [why for r in done["rounds"] for why in r["rejected"].values() if "stopped" in why]
            assert done["rounds"][-1]["metrics"]["val_accuracy"] >= 0.85
            # Any round's global model, from before the kill too.
            first = again.get(f"/sessions/{session_id}/model", round=0)
            assert first.status_code == 200 and first.content[:8]
            account = {"email": "ann@example.com", "password": "correct horse"}
            signed = requests.post(f"{base}/auth/signin", json=account)
            assert signed.status_code == 200, signed.text  # the user too
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(25)
    output = (tmp_path / "second.log").read_text()
    assert "Traceback" not in output, output[-3000:]
    assert f"session {session_id} resumed" in output


def started_make_run(env: dict[str, str], port: int, log) -> Any:
    """`make run` on `port` with `env`, its output to the open file `log`, in a process group of its own (to
    send it what a terminal would); returned once it serves."""
    import subprocess

    import requests

    from harness.processes import free_port

    process = subprocess.Popen(["make", "run"], cwd=ROOT, env={"FLOWER_PORT": str(free_port()), **env,
                                                               "PORT": str(port)},
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy() -> bool:
        assert process.poll() is None, f"make run exited ({process.returncode}): see {log.name}"
        try:
            return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    wait_until(healthy, 60, "make run to serve")
    return process
