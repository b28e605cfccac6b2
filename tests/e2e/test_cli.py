"""The `peertrain` command against the real platform: start and watch sessions, --json, exit statuses, resuming."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import requests

from settings import ROOT
from tests.client.test_cli import run
from tests.e2e.dropping_proxy import DroppingProxy

pytestmark = pytest.mark.e2e

WINE = ROOT / "samples" / "wine.csv"
EPOCHS = 4


@pytest.fixture
def cli(platform, tmp_path):
    """`peertrain` as a signed-up user of the platform, with a config directory of its own."""
    email = f"cli-{tmp_path.name[-12:]}@example.com".lower()

    def peertrain(*args: str, url: str = platform.base_url):
        return run("--url", url, *args, home=tmp_path, PEERTRAIN_PASSWORD="correct horse")

    done = peertrain("signup", "--email", email, "--json")
    assert done.returncode == 0, done.stderr
    peertrain.email = email
    peertrain.home = tmp_path
    return peertrain


def lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines()]


def test_start_watches_a_sweep_to_the_end_and_exits_0(platform, two_peers, cli, tmp_path):
    login = json.loads((tmp_path / "peertrain" / "credentials.json").read_text())
    assert platform.base_url in login["logins"]
    assert stat.S_IMODE((tmp_path / "peertrain" / "credentials.json").stat().st_mode) == 0o600

    peers = json.loads(cli("peers", "--json").stdout)
    assert {p["name"]: p["status"] for p in peers["peers"] if p["name"] in two_peers} == dict.fromkeys(two_peers,
                                                                                                         "ONLINE")
    shown = cli("peers").stdout
    assert f"{len(peers['peers'])} known, " in shown and "reputation" in shown
    # Each peer's record, as the coordinator counted it: a newcomer is neutral.
    assert all({"accepted", "rejected", "timed_out", "failed", "reputation"} <= p.keys() for p in peers["peers"])

    hp = json.dumps([{"learning_rate": 0.01}, {"learning_rate": 0.001}])
    done = cli("start", str(WINE), "--peers", "2", "--epochs", str(EPOCHS), "--hp", hp, "--json")
    assert done.returncode == 0, done.stderr
    events = lines(done.stdout)
    assert events[0]["event"] == "started" and sorted(events[0]["data"]["assigned_peers"]) == sorted(two_peers)
    session_id = events[0]["data"]["session_id"]
    stream = events[1:]
    assert stream[-1] == {"event": "end", "id": stream[-1]["id"], "data": {"status": "COMPLETED", "reason": None}}
    ids = [int(e["id"]) for e in stream]
    assert ids == sorted(set(ids)), "event ids repeat or go back"
    beats = [e["data"] for e in stream if e["event"] == "heartbeat"]
    assert sorted((b["peer"], b["epoch"]) for b in beats) == sorted((p, e) for p in two_peers
                                                                    for e in range(1, EPOCHS + 1))
    # --epochs applied to both peers' settings, each kept its own learning rate.
    shown = json.loads(cli("show", session_id[:12], "--json").stdout)  # the beginning of an id names it too
    assert shown["id"] == session_id
    assert [p["hyperparameters"]["learning_rate"] for p in shown["peers"]] == [0.01, 0.001]
    assert {p["epochs"] for p in shown["peers"]} == {EPOCHS}

    # Watching a finished session replays it, in plain lines since stdout is not a terminal.
    replay = cli("watch", session_id)
    assert replay.returncode == 0, replay.stderr
    text = replay.stdout.splitlines()
    for peer in two_peers:
        assert sum(line.startswith(f"{peer} epoch ") for line in text) == EPOCHS
        assert f"{peer} epoch {EPOCHS}/{EPOCHS} loss " in replay.stdout
    assert text[-1].startswith("COMPLETED (best peer ")

    listed = json.loads(cli("ls", "--json").stdout)  # = sessions
    assert [s["id"] for s in listed["items"]] == [session_id]
    logged = cli("logs", session_id)  # lines, whatever the output is
    assert logged.returncode == 0 and logged.stdout == replay.stdout
    model = cli.home / f"peertrain-{session_id}.safetensors"  # where `model` writes without -o
    saved = json.loads(cli("model", session_id, "--json").stdout)
    assert saved["bytes"] == model.stat().st_size > 0
    token = login["logins"][platform.base_url]["token"]
    served = requests.get(f"{platform.base_url}/sessions/{session_id}/model",
                          headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert model.read_bytes() == served.content


def test_an_asynchronous_session_is_started_and_watched_to_the_end(platform, two_peers, cli):
    done = cli("start", str(WINE), "--peers", "2", "--mode", "federated", "--schedule", "async", "--buffer-size", "1",
               "--max-updates", "6", "--local-epochs", "2")
    assert done.returncode == 0, done.stderr
    text = done.stdout.splitlines()
    assert text[-1].startswith("COMPLETED"), text[-3:]
    # Each peer's tasks are numbered for the session (update 1..6 between them), two epochs each.
    updates = sorted(int(line.split()[2]) for line in text if line.split()[1:2] == ["update"]
                     and line.split()[4] == "2/2")
    assert updates == list(range(1, 7)), text
    versions = [line for line in text if line.startswith("version ")]
    assert len(versions) == 6 and versions[-1].startswith("version 6/6 global model"), versions

    # Any version's global model downloads, as well as the final one; a version it does not have is refused.
    session_id = json.loads(cli("sessions", "--json").stdout)["items"][0]["id"]
    final, early = cli.home / "final.safetensors", cli.home / "early.safetensors"
    assert cli("model", session_id, "-o", str(final)).returncode == 0
    saved = json.loads(cli("model", session_id, "--round", "2", "-o", str(early), "--json").stdout)
    assert saved["bytes"] == early.stat().st_size > 0 and early.read_bytes() != final.read_bytes()
    missing = cli("model", session_id, "--round", "6", "-o", str(cli.home / "none.safetensors"))
    assert missing.returncode == 1 and "no round 6" in missing.stderr, missing
    assert not (cli.home / "none.safetensors").exists()


def test_a_failed_session_exits_1(platform, two_peers, cli, unique):
    broken = unique("clibroken")
    # It cannot fetch the data: its requests go through a proxy that refuses them.
    platform.start_peers(broken, HTTP_PROXY="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9")
    try:
        done = cli("start", str(WINE), "--peers", "3", "--epochs", "200", "--hp", "{}")  # as given: no search
    finally:
        platform.stop_peer(broken)
    assert done.returncode == 1, done
    last = done.stdout.splitlines()[-1]
    assert last.startswith("FAILED: ") and f"peer {broken} failed" in last
    assert f"{broken} FAILED: " in done.stdout  # the peer's own error, as it happened


def test_watch_resumes_after_a_dropped_connection_losing_and_repeating_nothing(platform, two_peers, cli):
    session_id = cli("start", str(WINE), "--peers", "2", "--epochs", "6", "--hp", "{}", "--detach").stdout.strip()
    proxy = DroppingProxy(int(platform.base_url.rsplit(":", 1)[1]), after=1500)
    try:
        # The same login works through the proxy's address once signed in there.
        assert cli("login", "--email", cli.email, url=proxy.url).returncode == 0
        done = cli("watch", session_id, "--json", url=proxy.url)
    finally:
        proxy.close()
    assert proxy.cuts == 1
    assert done.returncode == 0, done.stderr
    assert "reconnecting" in done.stderr
    events = lines(done.stdout)
    ids = [int(e["id"]) for e in events]
    assert ids == list(range(ids[0], ids[0] + len(ids))), "an event was lost or repeated"
    assert int(proxy.last_complete_event_id()) in ids[:-1]  # the cut fell mid-stream
    beats = [(e["data"]["peer"], e["data"]["epoch"]) for e in events if e["event"] == "heartbeat"]
    assert sorted(beats) == sorted((p, e) for p in two_peers for e in range(1, 7))
    assert events[-1]["event"] == "end" and events[-1]["data"]["status"] == "COMPLETED"


def test_the_token_file_is_private_even_when_rewritten(cli, tmp_path: Path):
    path = tmp_path / "peertrain" / "credentials.json"
    path.chmod(0o644)
    assert cli("login", "--email", cli.email).returncode == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_start_outlives_its_access_token_and_an_expired_sign_in_says_so(platform, two_peers, cli, tmp_path):
    """A session longer than an access token's life: the refresh token renews it, and `start` exits on the
    session's status, never the token's. Once the refresh token has expired too, the user is told to sign in."""
    from datetime import timedelta

    from flask_jwt_extended import create_access_token, create_refresh_token

    from models import User

    path = tmp_path / "peertrain" / "credentials.json"
    saved = json.loads(path.read_text())
    login = saved["logins"][platform.base_url]
    assert login["refresh"] and login["refresh_expires_at"] > login["expires_at"]
    user = User.objects.get(email=cli.email)
    with platform.platform.api.app_context():
        expired = create_access_token(identity=user, expires_delta=timedelta(seconds=-1))
        refresh_expired = create_refresh_token(identity=user, expires_delta=timedelta(seconds=-1))
    # A token the server refuses though the CLI believes it good: its first request (the CSV's upload) is
    # refused, the token renewed, the upload sent again.
    def keep(**fields) -> None:
        path.write_text(json.dumps({**saved, "logins": {platform.base_url: {**login, **fields}}}))

    keep(token=expired)
    done = cli("start", str(WINE), "--peers", "2", "--epochs", "3")
    assert done.returncode == 0 and done.stdout.splitlines()[-1].startswith("COMPLETED"), done
    renewed = json.loads(path.read_text())["logins"][platform.base_url]
    assert renewed["token"] not in (expired, login["token"]) and renewed["refresh"] == login["refresh"]
    # One the CLI knows has expired is renewed before anything is sent.
    keep(token=expired, expires_at=0)
    assert cli("sessions").returncode == 0
    # The refresh token refused too: the server's words, exit status 1.
    keep(token=expired, refresh=refresh_expired)
    refused = cli("sessions")
    assert refused.returncode == 1 and "your sign-in expired; sign in again" in refused.stderr, refused


def test_resume_goes_on_with_an_interrupted_sweep_from_its_checkpoints(platform, two_peers, cli):
    from harness.waiting import wait_until
    from models import Heartbeat, Peer
    from models import session as sessions
    from tasks import lifecycle

    epochs = 300  # a checkpoint every CHECKPOINT_EPOCHS (5), through each peer's grant, to S3
    started = cli("start", str(WINE), "--peers", "2", "--epochs", str(epochs), "--lr", "0.001", "--hp", "{}",
                  "--detach", "--json")
    assert started.returncode == 0, started.stderr
    session_id = json.loads(started.stdout)["session_id"]
    wait_until(lambda: all(Heartbeat.objects(session_id=session_id, peer=p, epoch__gte=12).count() for p in two_peers),
               60, "both peers past epoch 12")
    # The platform stops under it (make run's stop does this).
    assert lifecycle.end(platform.celery, session_id, sessions.INTERRUPTED, "the platform was stopped")
    shown = cli("show", session_id)
    assert "INTERRUPTED" in shown.stdout, shown.stdout
    wait_until(lambda: Peer.objects(name__in=two_peers, status="ONLINE").count() == 2, 30, "its peers, free again")

    done = cli("resume", session_id, "--json")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    events = lines(done.stdout)
    assert events[-1]["event"] == "end" and events[-1]["data"]["status"] == "COMPLETED"
    for name in two_peers:
        went_on = [line for line in platform.peers[name].log().splitlines() if f"session {session_id}: peer {name} "
                   "goes on from epoch" in line]
        assert went_on, platform.peers[name].log()[-2000:]
        epoch = int(went_on[-1].split("goes on from epoch ")[1].split()[0])
        assert epoch > 1 and (epoch - 1) % 5 == 0
        assert sorted(Heartbeat.objects(session_id=session_id, peer=name).scalar("epoch")) == list(range(1, epochs + 1))
    again = cli("resume", session_id)
    assert again.returncode == 1 and "only an INTERRUPTED session can be resumed" in again.stderr



def test_start_with_a_search_space_prints_each_trial_and_the_ranked_trials_at_the_end(platform, two_peers, cli,
                                                                                      tmp_path):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"learning_rate": {"low": 1e-3, "high": 3e-2, "log": True}, "batch_size": [16, 32],
                                 "epochs": EPOCHS}))
    done = cli("start", str(WINE), "--peers", "2", "--search", str(space), "--trials", "4", "--pruner", "median")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "search of 4 trials on wine.csv" in out
    for number in range(4):
        assert f"trial {number} on " in out
        assert f"trial {number} completed after " in out or f"trial {number} pruned after " in out
    # The ranked table: every trial, the winner starred, what ranks them said.
    assert "trials, ranked by val_accuracy on the held-out rows (ties: lower val_loss)" in out
    table = out[out.index("trials, ranked by"):]
    assert table.count("★") == 1 and all(peer in table for peer in two_peers)
    assert out.splitlines()[-1].startswith("COMPLETED (best trial ")  # the status last, below the table
    session_id = json.loads(cli("ls", "--json").stdout)["items"][0]["id"]
    best = json.loads(cli("show", session_id, "--json").stdout)["results"]["best_trial"]
    assert f"{best} ★" in table
    shown = cli("show", session_id[:8]).stdout
    assert "trials, ranked by val_accuracy" in shown and f"{best} ★" in shown


def test_a_sweep_without_settings_searches_with_the_ones_given_held_fixed(platform, two_peers, cli):
    done = cli("start", str(WINE), "--peers", "2", "--epochs", "3", "--trials", "2", "--json")
    assert done.returncode == 0, done.stderr
    ended = [e["data"] for e in lines(done.stdout) if e["event"] == "trial" and e["data"]["status"] in ("COMPLETED",
                                                                                                       "PRUNED")]
    trials = {t["number"]: t for t in ended}  # the last word on each
    assert sorted(trials) == [0, 1] and trials[0]["params"] != trials[1]["params"]
    trials = list(trials.values())
    assert {t["hyperparameters"]["epochs"] for t in trials} == {3}
