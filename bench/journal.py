"""Benchmark what `make run`'s journal (models.db.Journal: mongomock written to DATA_DIR as it changes) costs.

One process, mongomock behind the same lock as `make run`, seeded like a platform that has run a while
(users' sessions with their rounds and runs, heartbeats, assignments). Two loads run at once through the
product's own queries: the monitor's (a heartbeat batch stored with its events, a session's progress set,
a peer's sign of life, as tasks/monitor.py does for each batch), as fast as it can, and the API's
(`sessions.view`, what GET /sessions/<id> reads) from another thread, timed one by one. The baseline is the
same loads with no journal, measured in the same run, alternating, `--repeats` times each; then the
journal's own figures (time per flush, what each flush writes, the lock held).

Run: .venv/bin/python -m bench.journal [--seconds S] [--repeats N] [--interval S] [--sessions N] [--heartbeats N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bson import ObjectId

import models
from models import Round, TrainingSession
from models import assignment as assignments
from models import heartbeat as heartbeats
from models import peer as peers
from models import session as sessions
from models.session import Dataset, PeerRun


def seed(sessions_count: int, beats: int, rounds: int = 20, peer_count: int = 3) -> tuple[list[ObjectId], ObjectId]:
    """A database as after `sessions_count` federated sessions of `rounds` rounds on `peer_count` peers."""
    owner = ObjectId()
    names = [f"p{i}" for i in range(peer_count)]
    for name in names:
        peers.register(name)
        peers.seen(name, f"peer.{name}@bench")
    ids = []
    per_session = max(1, beats // sessions_count)
    for s in range(sessions_count):
        session = TrainingSession(
            owner_id=owner, target="label", features=[f"f{i}" for i in range(40)], mode=sessions.FEDERATED,
            status=sessions.COMPLETED if s else sessions.RUNNING,
            dataset=Dataset(filename="data.csv", url="file:///data.csv", bytes=1 << 20, sha256="0" * 64, rows=20_000,
                            columns=41, classes=[str(c) for c in range(7)]),
            peers=[PeerRun(name=name, hyperparameters={"learning_rate": 0.01, "epochs": 2}, epochs=rounds * 2)
                   for name in names],
            rounds=[Round(round=r, metrics={"val_loss": 0.5, "val_accuracy": 0.9, "samples": 16_000}, peers=names,
                          model_url=f"file:///m/{s}/{r}") for r in range(rounds)])
        session.save()
        ids.append(session.id)
        heartbeats.insert_many({"session_id": session.id, "peer": names[i % peer_count], "round": i // 6,
                                "epoch": i % 6 + 1, "loss": 0.5, "accuracy": 0.9} for i in range(per_session))
        assignments.record({"_id": f"{session.id}:{r}:{name}", "session_id": session.id, "peer": name, "round": r,
                            "epochs": 2, "position": p, "chord": None, "sent_at": models.utcnow(),
                            "deadline": models.utcnow(), "fixed": False}
                           for r in range(rounds) for p, name in enumerate(names))
    return ids, owner


EPOCHS = iter(range(1_000_000, 10**9))  # every batch's heartbeats new, across runs (a repeat costs a log read)


def run(seconds: float, running: ObjectId, owner: ObjectId, ids: list[ObjectId]) -> tuple[float, list[float]]:
    """The monitor's batches per second and the API's read latencies (ms) over `seconds`."""
    stop = threading.Event()
    latencies: list[float] = []

    def reader() -> None:
        i = 0
        while not stop.is_set():
            began = time.perf_counter()
            sessions.view(str(ids[i % len(ids)] if i % 2 else running), owner)
            latencies.append((time.perf_counter() - began) * 1000)
            i += 1
            time.sleep(0.002)  # a client's pace, not a saturating loop: what latency does a request see

    thread = threading.Thread(target=reader)
    thread.start()
    batches, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        epoch = next(EPOCHS)
        heartbeats.insert_many([{"session_id": running, "peer": f"p{k}", "round": 999, "epoch": epoch, "loss": 0.4}
                                for k in range(3)])
        sessions.record_progress(running, "p0", {"epoch": epoch % 1000, "loss": 0.4})
        peers.seen("p0", "peer.p0@bench")
        batches += 1
    elapsed = time.perf_counter() - began
    stop.set()
    thread.join()
    return batches / elapsed, latencies


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--interval", type=float, default=1.0, help="SNAPSHOT_SECONDS")
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--heartbeats", type=int, default=100_000)
    args = parser.parse_args()

    models.connect("mongomock://localhost/bench-journal")
    ids, owner = seed(args.sessions, args.heartbeats)
    running = ids[0]
    print(f"seeded: {args.sessions} sessions, {args.heartbeats} heartbeats, {args.sessions * 60} assignments; "
          f"journal every {args.interval} s; {args.repeats} × {args.seconds} s per row")
    rows: dict[str, list[tuple[float, list[float]]]] = {"no journal (baseline)": [], "journal": []}
    flushes: list[float] = []
    written: list[int] = []
    holds: list[float] = []
    with tempfile.TemporaryDirectory(prefix="peertrain-journal-") as tmp:
        journal = models.db.Journal(Path(tmp), args.interval)
        first = time.perf_counter()
        journal.start(every_collection=True)  # everything once: the files then hold what the database does
        journal.flush()
        print(f"a flush of everything (as save_snapshot at a clean stop): {time.perf_counter() - first:.2f} s, "
              f"{sum(p.stat().st_size for p in Path(tmp).glob('*.bson')) / 1e6:.1f} MB")
        journal.stop()
        for _ in range(args.repeats):
            rows["no journal (baseline)"].append(run(args.seconds, running, owner, ids))
            journal = models.db.Journal(Path(tmp), args.interval)
            timed = journal.flush

            def flush(timed=timed) -> int:
                began = time.perf_counter()
                size = timed()
                flushes.append(time.perf_counter() - began)
                written.append(size)
                return size

            journal.flush = flush
            journal.start()
            rows["journal"].append(run(args.seconds, running, owner, ids))
            journal.stop()
            holds.append(journal.longest_hold)
    base_rate = statistics.median(rate for rate, _ in rows["no journal (baseline)"])
    base = [v for _, lat in rows["no journal (baseline)"] for v in lat]
    print(f"{'':<24} {'monitor batches/s':>18} {'ratio':>6} {'API p50 ms':>11} {'p99':>7} {'max':>7} {'p99 ratio':>9}")
    for name, results in rows.items():
        rate = statistics.median(r for r, _ in results)
        latencies = [v for _, lat in results for v in lat]
        print(f"{name:<24} {rate:18.0f} {rate / base_rate:6.2f} {quantile(latencies, 0.5):11.2f} "
              f"{quantile(latencies, 0.99):7.2f} {max(latencies):7.1f} "
              f"{quantile(latencies, 0.99) / quantile(base, 0.99):9.2f}")
    print(f"flushes: {len(flushes)}, median {statistics.median(flushes) * 1000:.0f} ms, "
          f"max {max(flushes) * 1000:.0f} ms, median {statistics.median(written) / 1e3:.0f} kB written; "
          f"the lock held at most {max(holds) * 1000:.0f} ms; "
          f"a hard kill loses at most {args.interval:g} s + one flush ({(args.interval + max(flushes)):.2f} s here)")


if __name__ == "__main__":
    main()
