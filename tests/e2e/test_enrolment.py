"""Anyone can contribute a machine: enrolled over HTTP, joined by a process that holds only the token (a `HOME` of
its own), run with `peertrain peer run`, trained on only by its owner until shared, removed at once."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest
from kombu import Connection

from harness.processes import PeerProcess, peer_environment
from harness.waiting import wait_until
from models import Peer
from models.peer import ONLINE
from tasks import protocol
from tests import conftest
from tests.client.test_cli import PEERTRAIN, run

pytestmark = pytest.mark.e2e

HP = json.dumps({"learning_rate": 0.01, "epochs": 2, "batch_size": 32, "hidden": [32]})
# SGD: a fresh Adam per task overshoots from a good global model, and screening refuses such updates.
FEDERATED_HP = json.dumps({"optimizer": "sgd", "learning_rate": 0.05, "batch_size": 32, "hidden": [64]})


class Machine:
    """Another computer: its own HOME (and so config directory), the peertrain command, nothing of the platform's."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {**peer_environment(), "HOME": str(home), "XDG_CONFIG_HOME": str(home),
                    "PEER_THREADS": "1"}
        self.env = {k: v for k, v in self.env.items() if not k.startswith("PEERTRAIN_")}
        self.worker: subprocess.Popen | None = None
        self.log = home / "peer.log"

    def peertrain(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run(*args, home=self.home, **{k: v for k, v in self.env.items() if k not in ("HOME", "XDG_CONFIG_HOME")})

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.worker = subprocess.Popen([str(PEERTRAIN), "peer", "run"], env=self.env, cwd=self.home, stdout=out,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def interrupt(self, timeout: float = 30) -> int:
        """Ctrl-C, as its owner presses it in the terminal (the signal goes to the whole foreground group)."""
        os.killpg(self.worker.pid, signal.SIGINT)
        return self.worker.wait(timeout)

    def group_alive(self) -> bool:
        try:
            os.killpg(self.worker.pid, 0)
            return True
        except ProcessLookupError:
            return False


@pytest.fixture
def machine(tmp_path):
    found = Machine(tmp_path / "laptop")
    found.home.mkdir()
    yield found
    if found.worker is not None and found.worker.poll() is None:
        os.killpg(found.worker.pid, signal.SIGKILL)
        found.worker.wait(10)


def test_a_machine_joins_with_a_one_time_token_trains_only_for_its_owner_and_is_removed_at_once(
        platform, two_peers, digits_csv, machine):
    ann, bob = platform.user(), platform.user()
    name = f"laptop{conftest.RUN_ID}"
    enrolled = ann.post("/peers", json={"name": name})
    assert enrolled.status_code == 201, enrolled.text
    token = enrolled.json()["join_token"]
    assert enrolled.json()["command"].startswith(f"peertrain peer join --url {platform.base_url} --token ptj_")

    joined = machine.peertrain("peer", "join", "--url", platform.base_url, "--token", token)
    assert joined.returncode == 0, joined.stderr
    platform.logins.append(f"peer.{name}" + (f"@{platform.settings.broker_scope}"
                                              if platform.settings.broker_scope else ""))
    peer_file = machine.home / "peertrain" / "peer.env"
    assert stat.S_IMODE(peer_file.stat().st_mode) == 0o600
    assert f"PEER_NAME={name}" in peer_file.read_text()
    again = machine.peertrain("peer", "join", "--url", platform.base_url, "--token", token)
    assert again.returncode == 1 and "used already" in again.stderr

    machine.start()
    wait_until(lambda: Peer.objects(name=name, status=ONLINE).count() == 1, 60, f"{name} to come ONLINE",
               interval=0.25)

    # Bob cannot use Ann's machine: his `mine` has nothing, and her peer is not even listed to him.
    assert name not in {p["name"] for p in bob.get("/peers").json()["peers"]}
    refused = bob.start(digits_csv, num_peers=1, pool="mine", hyperparameters=HP)
    assert refused.status_code == 400 and "in pool 'mine'" in refused.json()["message"]

    started = ann.start(digits_csv, num_peers=1, pool="mine", hyperparameters=HP)
    assert started.status_code == 202, started.text
    assert started.json()["assigned_peers"] == [name]
    session = ann.wait_finished(started.json()["session_id"], timeout=120)
    assert session["status"] == "COMPLETED", session
    assert session["pool"] == "mine" and [p["name"] for p in session["peers"]] == [name]
    detail = ann.get(f"/peers/{name}").json()
    assert detail["accepted"] == 1 and detail["sessions"][0]["session_id"] == started.json()["session_id"]

    # Ctrl-C on the machine: the worker itself (`peer run` became it) shuts down warm, leaving nothing running.
    machine.interrupt()
    assert not machine.group_alive()
    log = machine.log.read_text()
    assert "Warm shutdown" in log and "Traceback" not in log, log[-3000:]

    environment = dict(line.split("=", 1) for line in peer_file.read_text().splitlines())
    assert ann.http.delete(f"{platform.base_url}/peers/{name}").status_code == 204
    with pytest.raises(Exception, match="ACCESS_REFUSED|refused"):
        with Connection(environment["BROKER_URL"], connect_timeout=5) as login:
            login.ensure_connection(max_retries=1)
    assert Peer.objects(name=name).count() == 0


def test_a_token_is_refused_after_expiry_and_peer_run_says_what_to_do_without_a_join(platform, machine):
    ann = platform.user()
    api = platform.api_app
    api.config["JOIN_TOKEN_SECONDS"] = 0
    try:
        token = ann.post("/peers", json={"name": f"late{conftest.RUN_ID}"}).json()["join_token"]
    finally:
        api.config["JOIN_TOKEN_SECONDS"] = platform.settings.join_token_seconds
    expired = machine.peertrain("peer", "join", "--url", platform.base_url, "--token", token)
    assert expired.returncode == 1 and "expired" in expired.stderr
    tampered = machine.peertrain("peer", "join", "--url", platform.base_url, "--token", token + "x")
    assert tampered.returncode == 1 and "not valid" in tampered.stderr
    assert not (machine.home / "peertrain" / "peer.env").exists()
    lost = machine.peertrain("peer", "run")
    assert lost.returncode == 2 and "peertrain peer join" in lost.stderr


def test_the_worker_command_the_cli_runs_is_the_platforms():
    from client import machine
    from tasks import protocol

    argv = machine.worker_argv(protocol.worker_command("x1"))
    assert argv[1:4] == ["-m", "celery", "-A"] and "peer.x1" in argv
    with pytest.raises(machine.PeerFileError):
        machine.worker_argv("rm -rf /")


def owned_peer(platform, user, name: str) -> str:
    """A machine of `user`'s, enrolled and joined over HTTP, its worker started with only what joining gave."""
    token = user.post("/peers", json={"name": name}).json()["join_token"]
    joined = user.post("/join", json={"token": token})
    assert joined.status_code == 200, joined.text
    platform.logins.append(protocol.broker_user(name, platform.settings.broker_scope))
    environment = peer_environment(**joined.json()["environment"], PEER_THREADS="1")
    platform.peers[name] = PeerProcess(name, platform.log_dir, environment)
    return name


def online(names: list[str], timeout: float = 60) -> None:
    wait_until(lambda: Peer.objects(name__in=names, status=ONLINE).count() == len(names), timeout,
               f"{names} to come ONLINE", interval=0.25)


def test_a_peer_that_comes_online_mid_session_is_used_by_an_asynchronous_and_an_elastic_synchronous_one(
        platform, digits_csv):
    user = platform.user()
    first = owned_peer(platform, user, f"el1{conftest.RUN_ID}")
    online([first])
    late = f"el2{conftest.RUN_ID}"
    try:
        # Asynchronous: the newcomer is handed tasks as soon as it is online.
        started = user.start(digits_csv, num_peers=1, pool="mine", mode="federated", schedule="async",
                             buffer_size=1, max_updates=1000, time_budget=45, local_epochs=1,
                             hyperparameters=FEDERATED_HP)
        assert started.status_code == 202, started.text
        session_id = started.json()["session_id"]
        assert user.session(session_id)["elastic"] is True
        owned_peer(platform, user, late)
        wait_until(lambda: late in [p["name"] for p in user.session(session_id)["peers"]], 90,
                   f"{late} to join the asynchronous session", interval=0.25)
        done = user.wait_finished(session_id, timeout=180)
        assert done["status"] == "COMPLETED", done
        folded = {u["peer"] for version in done["rounds"] for u in version["updates"]}
        assert folded == {first, late}, folded

        # Synchronous and elastic: the second machine, paused, is left out of the start; resumed, it joins at
        # the round after it comes back.
        assert user.http.patch(f"{platform.base_url}/peers/{late}", json={"paused": True}).status_code == 200
        online([late])
        started = user.start(digits_csv, num_peers=1, pool="mine", mode="federated", rounds=40, local_epochs=1,
                             elastic="true", max_peers=2, hyperparameters=FEDERATED_HP)
        assert started.status_code == 202, started.text
        session_id = started.json()["session_id"]
        assert started.json()["assigned_peers"] == [first]
        wait_until(lambda: len(user.session(session_id)["rounds"]) >= 1, 60, "a round without it")
        assert user.http.patch(f"{platform.base_url}/peers/{late}", json={"paused": False}).status_code == 200
        done = user.wait_finished(session_id, timeout=240)
        assert done["status"] == "COMPLETED", done
        rounds = [sorted(r["peers"]) for r in done["rounds"]]
        assert rounds[0] == [first] and rounds[-1] == sorted([first, late]), rounds
        joined_at = rounds.index(sorted([first, late]))
        assert all(r == sorted([first, late]) for r in rounds[joined_at:])  # from then on, every round
    finally:
        for name in (first, late):
            if name in platform.peers:
                platform.stop_peer(name)
