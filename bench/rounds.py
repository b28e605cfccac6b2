"""Benchmark federated rounds on the real broker: the overhead of a round, and the first session against the next.

The tabular job of issue 13: 20,000 rows x 40 features, 7 classes (scikit-learn's make_classification), 3 peers,
5 rounds x 2 local epochs, an MLP 128-64, assembled as bench/session.py assembles the platform (API, coordinator
and monitor in this process on mongomock; real RabbitMQ and Redis; peers as real `celery worker` processes with
logins of their own; storage a scratch directory reached through the API's grants). The platform starts fresh,
and its first session runs at once, as a user's first session would.

A round's overhead is its wall time (previous round recorded -> this round recorded; the first round from the
session's start) less the slowest peer's own training time in it (its epochs' `seconds`): the baseline is the
training itself, measured in the same run. The timeline splits each round (median over the rounds after the
first of every session but the first) from the task events, heartbeats and result timestamps (one clock).

`--steps` (harness/steps.py) also times the coordinator's own steps of each round (wall and the thread's CPU,
median over the rounds of every session but the first), by wrapping the product's functions for the run.

Run: .venv/bin/python -m bench.rounds [--sessions 3] [--rounds 5] [--local-epochs 2] [--steps]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from celery.result import AsyncResult

from bench import session as base  # the environment and the platform
from harness.datasets import tabular_csv
from harness.steps import STEPS, timed_steps
from models import Heartbeat, TrainingSession

PEERS = 3
TARGET_OVERHEAD, TARGET_FIRST = 0.025, 1.10  # issue 22: median, rounds after the first


def federated(platform: base.Platform, csv: Path, rounds: int, local_epochs: int) -> dict:
    """One session through the API; its rounds' walls, training times and timeline points (epoch seconds)."""
    hp = {"learning_rate": 0.003, "batch_size": 64, "hidden": [128, 64]}
    t0 = time.perf_counter()
    response = platform.api.start(csv, num_peers=PEERS, mode="federated", rounds=rounds, local_epochs=local_epochs,
                                  hyperparameters=json.dumps(hp))
    assert response.status_code == 202, response.text
    sid = response.json()["session_id"]
    while (doc := platform.api.session(sid))["status"] in ("PENDING", "RUNNING"):
        time.sleep(0.25)
    wall = time.perf_counter() - t0
    assert doc["status"] == "COMPLETED", doc
    session = TrainingSession.objects(id=sid).first()
    beats = list(Heartbeat.objects(session_id=session.id))
    tasks = {}  # (round, peer) -> that task's events
    for events in platform.events.tasks.values():
        sent = events.get("task-sent")
        if sent and f"session {sid}," in str(sent.get("args")):
            words = str(sent["args"]).strip("()").replace(",", "").split()  # session X round R peer P
            tasks[(int(words[3]), words[5])] = events
    marks = [base.stamp(session.started_at)] + [base.stamp(r.finished_at) for r in session.rounds]
    per_round = []
    for r in range(rounds):
        mine = [b for b in beats if b.round == r]
        train = {p: sum(b.seconds for b in mine if b.peer == p) for p in {b.peer for b in mine}}
        point = {"wall": marks[r + 1] - marks[r], "train": max(train.values())}
        events = [tasks[k] for k in tasks if k[0] == r]
        if len(events) == PEERS and all("task-started" in e and "task-succeeded" in e for e in events):
            ends = {b.peer: max(x.sent_at.timestamp() for x in mine if x.peer == b.peer) for b in mine}
            begins = {p: min(x.sent_at.timestamp() - x.seconds for x in mine if x.peer == p) for p in ends}
            stored = [base.stamp(AsyncResult(e["task-sent"]["uuid"], app=platform.app).date_done) for e in events]
            point.update(
                sent=max(e["task-sent"]["timestamp"] for e in events) - marks[r],
                started=max(e["task-started"]["timestamp"] for e in events) - marks[r],
                began=max(begins.values()) - marks[r], ended=max(ends.values()) - marks[r],
                stored=max(stored) - marks[r], recorded=marks[r + 1] - marks[r])
        per_round.append(point)
    return {"wall": wall, "doc_wall": base.stamp(session.finished_at) - base.stamp(session.created_at),
            "rounds": per_round, "accuracy": doc["results"]["best_value"]}


TIMELINE = (("sent", "last train task sent (task-sent)"), ("started", "last task started on its peer (task-started)"),
            ("began", "last peer's training loop began (shard, model, global weights ready)"),
            ("ended", "last peer's training loop ended"), ("stored", "last result stored (its weights uploaded)"),
            ("recorded", "round aggregated, evaluated and recorded"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--steps", action="store_true", help="time the coordinator's steps of each round")
    args = parser.parse_args()
    times: dict[str, list[tuple[float, float]]] = {}
    assert base.os.environ["BROKER_URL"].startswith("amqp://"), "needs RabbitMQ"
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per poll and grant would clutter
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peertrain-bench-rounds-") as scratch:
        csv = tabular_csv(Path(scratch) / "tabular.csv")
        platform = base.Platform()
        try:
            platform.start(Path(scratch), peers=PEERS)
            print(f"platform up in {time.perf_counter() - began:.1f} s; {PEERS} peers;"
                  f" {csv.stat().st_size / 1e6:.1f} MB CSV (20,000 x 40, 7 classes);"
                  f" {args.rounds} rounds x {args.local_epochs} local epochs, MLP 128-64")
            runs = [federated(platform, csv, args.rounds, args.local_epochs)]
            with timed_steps(times) if args.steps else contextlib.nullcontext():
                runs += [federated(platform, csv, args.rounds, args.local_epochs) for _ in range(args.sessions - 1)]
        finally:
            platform.stack.close()
    print(f"\n{'session':>7} {'wall':>7} {'sum(train)':>10} {'overhead/round':>15}   per round: wall / slowest peer's"
          " training")
    overheads = []
    for i, run in enumerate(runs):
        train = sum(r["train"] for r in run["rounds"])
        per = [r["wall"] - r["train"] for r in run["rounds"]]
        if i:
            overheads += per
        rounds = "  ".join(f"{r['wall'] * 1000:.0f}/{r['train'] * 1000:.0f}" for r in run["rounds"])
        print(f"{i + 1:>7} {run['wall']:6.2f}s {train:9.2f}s {statistics.mean(per) * 1000:12.0f} ms   {rounds} ms"
              f"   (accuracy {run['accuracy']:.3f})")
    points = [r for run in runs[1:] for r in run["rounds"][1:] if "sent" in r]
    if points:
        print("\ntimeline of a round (median, rounds 2.. of sessions 2..), ms after the previous round was recorded:")
        for key, what in TIMELINE:
            print(f"  {statistics.median(p[key] for p in points) * 1000:7.0f}  {what}")
    if times:
        print("\nthe coordinator's steps (sessions 2..), median ms per call: wall / the thread's CPU")
        for _, _, label in STEPS:
            if found := times.get(label):
                print(f"  {statistics.median(w for w, _ in found) * 1000:6.1f} / "
                      f"{statistics.median(c for _, c in found) * 1000:5.1f}  {label} ({len(found)} calls)")
    mean = statistics.mean(overheads) if overheads else float("nan")
    ratio = runs[0]["wall"] / runs[1]["wall"] if len(runs) > 1 else float("nan")
    later = [r["wall"] - r["train"] for run in runs[1:] for r in run["rounds"][1:]]
    median = statistics.median(later) if later else float("nan")
    print(f"\noverhead per round, sessions 2..: mean {mean * 1000:.0f} ms, median "
          f"{statistics.median(overheads) * 1000:.0f} ms; rounds after the first: median {median * 1000:.0f} ms"
          f" (target <= {TARGET_OVERHEAD * 1000:.0f} ms): {'MET' if median <= TARGET_OVERHEAD else 'NOT MET'}")
    print(f"first session / second: {runs[0]['wall']:.2f} s / {runs[1]['wall']:.2f} s = {ratio:.2f}x"
          f" (target <= {TARGET_FIRST}): {'MET' if ratio <= TARGET_FIRST else 'NOT MET'}")
    print(f"total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
