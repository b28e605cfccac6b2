"""Benchmark the event stream under `make run`: heartbeat emitted on a peer → event received by a stream client.

Starts the platform as `make run` does (`python -m embedded`: granian, the monitor, the coordinator and
LOCAL_PEERS in-process peers on the in-memory broker and mongomock), signs up, and runs sweeps on a
synthetic CSV large enough that an epoch takes a noticeable time (as real training does), so heartbeats
come one by one rather than in a burst. A stream client follows each session; every heartbeat carries
`sent_at`, the peer's clock when it finished the epoch and reported it, and the client notes when the
event arrived (same machine, same clock). The baseline, measured on the same sessions in the same run,
is what a client had before the stream: polling GET /sessions/<id>/heartbeats once a second.

Run: .venv/bin/python -m bench.stream [--sessions N] [--epochs E] [--rows R]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import requests

from harness.http import Api
from harness.waiting import wait_until
from settings import ROOT

TARGET_P95_MS = 250.0


def synthetic_csv(path: Path, rows: int, features: int = 32, classes: int = 4, seed: int = 0) -> Path:
    """Gaussian blobs: a classification CSV whose epochs take a while on one thread."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, rows)
    centres = rng.normal(0, 3, (classes, features))
    x = centres[labels] + rng.normal(0, 1, (rows, features))
    header = ",".join([f"f{i}" for i in range(features)] + ["label"])
    np.savetxt(path, np.column_stack([x, labels]), delimiter=",", header=header, comments="",
               fmt=["%.4f"] * features + ["%d"])
    return path


def epoch_time(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


class Platform:
    """`python -m embedded` on a free port, stopped with SIGTERM as Ctrl-C would."""

    def __init__(self, peers: int, log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.storage = tempfile.TemporaryDirectory(prefix="peertrain-bench-")
        env = {k: v for k, v in os.environ.items()
               if k not in ("BROKER_URL", "RESULT_BACKEND", "MONGODB_URI", "STORAGE_URL", "S3_ENDPOINT_URL")}
        env.update(PORT=str(self.port), LOCAL_PEERS=str(peers), STORAGE_URL=self.storage.name, LOG_LEVEL="WARNING",
                   FLOWER_PORT="0")
        self.log = log.open("wb")
        self.process = subprocess.Popen([sys.executable, "-m", "embedded"], cwd=ROOT, env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.base = f"http://127.0.0.1:{self.port}"

        def healthy() -> bool:
            assert self.process.poll() is None, log.read_text()[-3000:]
            try:
                return requests.get(f"{self.base}/healthz", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(healthy, 120, "make run's API", interval=0.25)

    def close(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.log.close()
        self.storage.cleanup()


def follow(user: Api, session_id: str, into: list[float]) -> None:
    """The stream client: for each heartbeat, arrival − sent_at."""
    for event in user.events(session_id):
        arrived = time.time()
        if event["event"] == "heartbeat":
            into.append(arrived - epoch_time(event["data"]["sent_at"]))


def poll(user: Api, session_id: str, into: list[float], period: float, stop: threading.Event) -> None:
    """The baseline client: GET /heartbeats every `period`; for each heartbeat, first seen − sent_at."""
    seen: set[tuple[str, int, int]] = set()
    while True:
        finished = stop.is_set()
        now = time.time()
        for beat in user.heartbeats(session_id):
            key = (beat["peer"], beat["round"], beat["epoch"])
            if key not in seen:
                seen.add(key)
                into.append(now - epoch_time(beat["sent_at"]))
        if finished:
            return
        stop.wait(period)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--rows", type=int, default=40_000)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)

    folder = Path(tempfile.mkdtemp(prefix="peertrain-bench-stream-"))
    csv = synthetic_csv(folder / "blobs.csv", args.rows)
    platform = Platform(args.peers, folder / "make-run.log")
    streamed: list[float] = []
    polled: list[float] = []
    seconds = []
    try:
        user = Api(platform.base).sign_up_and_in("bench")
        wait_until(lambda: user.get("/peers").json()["free"] == args.peers, 60, "the local peers")
        hp = json.dumps({"learning_rate": 0.001, "epochs": args.epochs, "hidden": [128, 64], "batch_size": 64})
        print(f"make run (granian ASGI, in-memory broker, mongomock), {args.peers} peers; {args.sessions} sweeps of "
              f"{args.epochs} epochs on {args.rows:,} x 32 rows; {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f}")
        for _ in range(args.sessions):
            began = time.monotonic()
            response = user.start(csv, num_peers=args.peers, hyperparameters=hp)
            assert response.status_code == 202, response.text
            session_id = response.json()["session_id"]
            stop = threading.Event()
            poller_user = Api(platform.base)
            poller_user.http.headers.update(user.http.headers)
            poller = threading.Thread(target=poll, args=(poller_user, session_id, polled, 1.0, stop))
            poller.start()
            follow(user, session_id, streamed)
            stop.set()
            poller.join(30)
            seconds.append(time.monotonic() - began)
            assert user.session(session_id)["status"] == "COMPLETED"
    finally:
        platform.close()

    expected = args.sessions * args.peers * args.epochs
    assert len(streamed) == expected == len(polled), (len(streamed), len(polled), expected)
    print(f"{expected} heartbeats, sessions of {min(seconds):.1f}-{max(seconds):.1f} s "
          f"(an epoch every {min(seconds) / args.epochs:.2f} s or so per peer)")
    print(f"{'client':<44} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7}   ms from sent_at to seen")
    for name, values in (("stream (GET /sessions/<id>/events)", streamed),
                         ("baseline: polling /heartbeats every 1 s", polled)):
        print(f"{name:<44} {quantile(values, 0.5):7.0f} {quantile(values, 0.95):7.0f} "
              f"{quantile(values, 0.99):7.0f} {max(values) * 1e3:7.0f}")
    p95 = quantile(streamed, 0.95)
    verdict = "met" if p95 <= TARGET_P95_MS else "NOT met"
    print(f"summary: stream p95 {p95:.0f} ms (target ≤ {TARGET_P95_MS:.0f} ms: {verdict}); "
          f"{quantile(polled, 0.5) / quantile(streamed, 0.5):.1f}x sooner than 1 s polling at the median, "
          f"{quantile(polled, 0.95) / p95:.1f}x at p95")


if __name__ == "__main__":
    main()
