"""Benchmark the embedded arrangement under load: 32 real peer processes, API, coordinator and monitor in one process.

As issue 13 measured it (`make run` on a real RabbitMQ, peers as real worker processes on 2 cores): the API,
the coordinator and the monitor are threads of this process sharing one mongomock client (bench/session.py's
platform), and `--peers` real `celery worker` peers (~0.4 GB each) train a tiny model. Sweeps and federated
sessions of every peer run one after another; every one must complete (at 32 peers a session used to fail
on `RuntimeError: dictionary changed size during iteration` inside mongomock, or on peers timing out behind
a starved monitor). For each: its wall time over the slowest peer's own training (the overhead), and the
heartbeats the monitor stored per second of the session.

Run: .venv/bin/python -m bench.crowd [--peers 32] [--sessions 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from bench import session as base  # the environment and the platform
from harness.datasets import sklearn_csv
from models import Heartbeat, TrainingSession

HP = {"learning_rate": 0.003, "batch_size": 64, "hidden": [32]}


def run(platform: base.Platform, csv: Path, peers: int, mode: str) -> dict:
    """One session of every peer; its outcome, wall, overhead per round and heartbeats stored per second."""
    form = {"num_peers": peers, "hyperparameters": json.dumps({**HP, "epochs": 5})}
    rounds = 1
    if mode == "federated":
        rounds = 5
        form.update(mode="federated", rounds=rounds, local_epochs=2, hyperparameters=json.dumps(HP))
    stored0, t0 = platform.monitor.stored, time.perf_counter()
    response = platform.api.start(csv, **form)
    assert response.status_code == 202, response.text
    sid = response.json()["session_id"]
    while (doc := platform.api.session(sid))["status"] in ("PENDING", "RUNNING"):
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    session = TrainingSession.objects(id=sid).first()
    beats = list(Heartbeat.objects(session_id=session.id).only("peer", "round", "seconds"))
    peers_seen = {b.peer for b in beats}
    # Per round, the slowest peer's own training time (its epochs' seconds).
    train = sum(max((sum(b.seconds or 0 for b in beats if b.round == r and b.peer == p) for p in peers_seen),
                    default=0) for r in range(rounds))
    doc_wall = base.stamp(session.finished_at) - base.stamp(session.created_at)
    return {"mode": mode, "status": doc["status"], "reason": doc.get("reason"), "wall": wall,
            "overhead": (doc_wall - train) / rounds, "beats": len(beats),
            "monitor_rate": (platform.monitor.stored - stored0) / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=32)
    parser.add_argument("--sessions", type=int, default=3, help="sweeps, and as many federated sessions")
    args = parser.parse_args()
    assert base.os.environ["BROKER_URL"].startswith("amqp://"), "needs RabbitMQ"
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peertrain-bench-crowd-") as scratch:
        csv = sklearn_csv(Path(scratch) / "digits.csv", "digits")
        platform = base.Platform()
        try:
            platform.start(Path(scratch), peers=args.peers)
            platform.events.stop()  # only the monitor consumes events in this process
            print(f"{args.peers} real peer processes ONLINE in {time.perf_counter() - began:.0f} s")
            runs = [run(platform, csv, args.peers, mode) for mode in ("sweep", "federated")
                    for _ in range(args.sessions)]
            report(runs, args)
        finally:
            platform.stack.close()
    print(f"total {time.perf_counter() - began:.0f} s")


def report(runs: list[dict], args: argparse.Namespace) -> None:
    """Each session's outcome, the median overheads, and whether every session completed."""
    print(f"\n{'mode':>9} {'status':>9} {'wall':>7} {'overhead':>12} {'heartbeats':>10} {'monitor stored':>15}")
    for r in runs:
        print(f"{r['mode']:>9} {r['status']:>9} {r['wall']:6.1f}s {r['overhead'] * 1000:9.0f} ms {r['beats']:>10}"
              f" {r['monitor_rate']:12.0f}/s" + (f"   {r['reason']}" if r["reason"] else ""))
    completed = sum(r["status"] == "COMPLETED" for r in runs)
    for mode in ("sweep", "federated"):
        mine = [r["overhead"] for r in runs if r["mode"] == mode]
        print(f"{mode} overhead (per round): median {statistics.median(mine) * 1000:.0f} ms")
    print(f"{completed} of {len(runs)} sessions COMPLETED with {args.peers} peers (target: all):"
          f" {'MET' if completed == len(runs) else 'NOT MET'}", flush=True)


if __name__ == "__main__":
    main()
