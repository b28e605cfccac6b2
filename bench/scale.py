"""Benchmark the coordinator and the monitor with up to 1,000 simulated peers on the real broker.

The platform as bench/session.py assembles it (API, coordinator and monitor in this process on mongomock,
real RabbitMQ and Redis, storage a scratch directory reached through the API's grants: the API in this process
serves the peers' transfers too, since a grant opens nothing once its task is decided and only this process
holds the database that says so), and simulated
peers (bench/simulated.py) in a few other processes: each registered with a broker login of its own as
an operator registers a peer, a real consumer of its own queue, sending real worker and heartbeat
events and real (tiny) weight updates through its grants. Nothing in the platform knows they are
simulated. Sessions go through the API (MAX_PEERS_PER_SESSION is raised for the run).

1. Registration: `tasks.registry.add` for every peer (RabbitMQ users through the management API).
2. Rounds at 10, 100 and 1,000 peers (federated, tiny model, one local epoch of `--epoch-seconds`):
   - dispatched: the round recorded -> every peer has its next task (each peer notes when its task arrived);
   - join + aggregate: the last peer published its result -> the round aggregated and recorded;
   - the coordinator's CPU time per round (its worker thread's clock), against the 10-peer run: the
     cost of each extra peer, and whether it stays linear from 10 to 1,000.
3. Monitor: every peer sends a heartbeat every `--epoch-seconds` for a minute; the monitor must store
   every one (0 dropped) and keep up (>= 2,000 events/s), measured against the rate the peers sent.

Run: .venv/bin/python -m bench.scale [--peers 1000] [--rounds 4] [--processes 2] [--sustain 60] [--private-broker]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("MAX_PEERS_PER_SESSION", "1000")
ROOT = Path(__file__).resolve().parent.parent


def private_broker() -> None:
    """Start a RabbitMQ node of this run's own that can hold a connection per peer, and use it.

    Each peer holds a connection of its own (its login), and the shared node's file descriptor limit
    (1,024: ~830 sockets) cannot hold a thousand; this node starts with a higher one. Must run before
    anything imports Celery's settings."""
    import atexit

    from harness.rabbitnode import RabbitNode

    node = RabbitNode()
    # The node runs as user rabbitmq, whose login shell gets 1,024 files; its environment file is
    # sourced by that shell before the node starts, so it can raise the limit within the hard one.
    with (node.dir / "env.conf").open("a") as env:
        env.write("ulimit -n 20000 2>/dev/null || ulimit -n 8192\n")
    node.start()
    atexit.register(node.remove)
    os.environ.update(BROKER_URL=node.url, BROKER_ADMIN_URL=node.admin_url)


if "--private-broker" in sys.argv:
    private_broker()

from bench import session as base  # noqa: E402  (the environment and the platform)
from harness.datasets import blobs_csv  # noqa: E402
from harness.simulated import Fleet, Options  # noqa: E402
from harness.waiting import wait_until  # noqa: E402
from models import Heartbeat, Peer, TrainingSession, utcnow  # noqa: E402
from settings import Settings  # noqa: E402

TARGET_DISPATCH, TARGET_JOIN, TARGET_RATE, TARGET_PER_PEER, TARGET_ONLINE = 2.0, 2.0, 2000.0, 0.003, 60.0
HP = {"learning_rate": 0.01, "batch_size": 32, "hidden": [8]}


def thread_cpu(thread) -> float:
    """CPU seconds a thread of this process has used."""
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def register(platform: base.Platform, names: list[str]) -> dict[str, str]:
    """Register every peer as an operator does (8 at a time); their broker URLs."""
    with ThreadPoolExecutor(8) as pool:
        urls = list(pool.map(lambda name: platform.register(name)["BROKER_URL"], names))
    return dict(zip(names, urls, strict=True))


def start(platform: base.Platform, csv: Path, peers: int, rounds: int, local_epochs: int) -> str:
    response = platform.api.start(csv, num_peers=peers, mode="federated", rounds=rounds, local_epochs=local_epochs,
                                  hyperparameters=json.dumps(HP))
    assert response.status_code == 202, response.text
    return response.json()["session_id"]


def finished(platform: base.Platform, session_id: str, timeout: float) -> TrainingSession:
    wait_until(lambda: TrainingSession.objects(id=session_id, status__nin=["PENDING", "RUNNING"]).count(), timeout,
               f"session {session_id} to finish", interval=0.2)
    session = TrainingSession.objects(id=session_id).first()
    assert session.status == "COMPLETED", (session.status, session.reason)
    return session


def rounds(platform: base.Platform, fleet: Fleet, csv: Path, peers: int, count: int) -> dict:
    """One federated session of `peers` peers: per round, dispatch and join times and the coordinator's CPU."""
    coordinator = platform.workers.threads[0]
    cpu0, t0 = thread_cpu(coordinator), time.time()
    session = finished(platform, start(platform, csv, peers, count, 1), 120 + peers)
    cpu = thread_cpu(coordinator) - cpu0
    seen, failures = fleet.seen()
    failed = {name: f for name, f in failures.items() if f}
    assert not failed, failed
    sid = str(session.id)
    by_round: dict[int, list] = {}
    for tasks in seen.values():
        for task in tasks:
            if task.session == sid:
                by_round.setdefault(task.round, []).append(task)
    recorded = [base.stamp(r.finished_at) for r in session.rounds]
    out = {"peers": peers, "cpu_per_round": cpu / count, "wall": time.time() - t0, "dispatch": [], "join": []}
    for r in range(count):
        got = by_round.get(r, [])
        assert len(got) == peers, f"round {r}: {len(got)} of {peers} peers got their task"
        if r:
            out["dispatch"].append(max(t.received for t in got) - recorded[r - 1])
        out["join"].append(recorded[r] - max(t.reported for t in got))
    print(f"  session of {peers} peers: {out['wall']:.1f} s", flush=True)
    return out


def sustained(platform: base.Platform, csv: Path, peers: int, seconds: float, epoch_seconds: float) -> None:
    """Every peer sends a heartbeat every epoch_seconds for `seconds`: the monitor must store them all, in time."""
    epochs = max(1, round(seconds / epoch_seconds))
    deployed = platform.monitor
    stored0, dropped0 = deployed.stored, sum(deployed.dropped.values())
    sid = start(platform, csv, peers, 1, epochs)
    expected = peers * epochs
    wait_until(lambda: TrainingSession.objects(id=sid, status="RUNNING").count(), 120, "the session to run")
    samples, t0 = [], time.monotonic()
    while TrainingSession.objects(id=sid, status="RUNNING").count():
        samples.append((time.monotonic() - t0, deployed.stored - stored0))
        time.sleep(1.0)
    session = finished(platform, sid, 60)
    stored = Heartbeat.objects(session_id=session.id).count()
    dropped = sum(deployed.dropped.values()) - dropped0
    by_monitor = deployed.stored - stored0
    # What the peers really sent (each heartbeat carries when its epoch ended), and the monitor's pace
    # over the same stretch: from the first second with heartbeats stored to the last before all were.
    sent_at = sorted(b.sent_at.timestamp() for b in Heartbeat.objects(session_id=session.id).only("sent_at"))
    sent = len(sent_at) / (sent_at[-1] - sent_at[0])
    steady = [(t, n) for t, n in samples if 0 < n < expected]
    rate = (steady[-1][1] - steady[0][1]) / (steady[-1][0] - steady[0][0]) if len(steady) > 2 else 0.0
    worker_beats = peers / 2.0
    print(f"\n== monitor, {peers} peers x {epochs} heartbeats, one every {epoch_seconds:g} s each (~{seconds:g} s):")
    print(f"  peers sent {sent:,.0f} heartbeats/s over {sent_at[-1] - sent_at[0]:.0f} s (+ {worker_beats:,.0f} worker"
          f" heartbeats/s); the monitor stored {rate:,.0f}/s over {steady[-1][0] - steady[0][0]:.0f} s ="
          f" {rate / sent:.2f}x the rate sent, {rate + worker_beats:,.0f} events/s")
    print(f"  stored {stored:,} of {expected:,} ({by_monitor:,} by the monitor, the rest from the peers' results);"
          f" dropped {dropped}")
    ok = stored == expected and dropped == 0 and rate + worker_beats >= TARGET_RATE
    print(f"  target: every heartbeat stored, 0 dropped, >= {TARGET_RATE:,.0f} events/s: {'MET' if ok else 'NOT MET'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--processes", type=int, default=2, help="processes hosting the simulated peers")
    parser.add_argument("--sizes", default="10,100", help="smaller sessions to run first, comma-separated")
    parser.add_argument("--epoch-seconds", type=float, default=0.5)
    parser.add_argument("--sustain", type=float, default=60.0, help="seconds of the monitor's sustained load")
    parser.add_argument("--private-broker", action="store_true",
                        help="run on a RabbitMQ node of this run's own, with room for a connection per peer"
                             " (needed past ~800 peers on a default node; needs root)")
    parser.add_argument("--verbose", action="store_true", help="log the monitor's and the coordinator's judgements")
    args = parser.parse_args()
    assert os.environ["BROKER_URL"].startswith("amqp://"), f"needs RabbitMQ, not {os.environ['BROKER_URL']}"
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    logging.getLogger("tasks.collector").setLevel(logging.ERROR)
    if args.verbose:  # what the monitor judged of the peers, and when
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        for name in ("tasks.monitor", "tasks.strategy", "tasks.federated"):
            logging.getLogger(name).setLevel(logging.INFO)
            logging.getLogger(name).addHandler(handler)
    began = time.perf_counter()
    sizes = sorted({n for n in (*(int(v) for v in args.sizes.split(",")), args.peers) if n <= args.peers})
    with tempfile.TemporaryDirectory(prefix="peertrain-bench-scale-") as scratch:
        # Enough rows that every peer's shard holds a few (the federated split needs each one non-empty).
        csv = blobs_csv(Path(scratch) / "blobs.csv", rows=max(2000, 12 * args.peers), features=10, classes=3)
        platform = base.Platform()
        fleet = None
        try:
            platform.start(Path(scratch), peers=0)
            platform.events.stop()  # the bench's own event receiver would compete with the monitor
            names = [f"sim{base.RUN_ID}{i:04d}" for i in range(args.peers)]
            t0 = time.perf_counter()
            logins = register(platform, names)
            took = time.perf_counter() - t0
            print(f"platform up; {args.peers} peers registered in {took:.1f} s ({took / args.peers * 1000:.0f} ms"
                  f" each: a broker user, its rights and limits through RabbitMQ's management API)")
            settings = Settings.from_env()
            options = Options(settings.event_exchange, settings.results_queue, args.epoch_seconds)
            fleet = Fleet(logins, options, processes=args.processes)
            t0 = time.perf_counter()
            fleet.start()
            wait_until(lambda: Peer.objects(name__in=names, status="ONLINE").count() == args.peers, 300,
                       "every simulated peer ONLINE", interval=0.5)
            online = time.perf_counter() - t0
            # A claim takes only peers heard from within the silence limit: the monitor must have read their
            # worker events by then, not only the broker have seen them consume.
            fresh = timedelta(seconds=Settings.from_env().peer_timeout_seconds)
            wait_until(lambda: Peer.objects(name__in=names, status="ONLINE", last_seen__gte=utcnow() - fresh).count()
                       == args.peers, 300, "every simulated peer claimable", interval=0.5)
            print(f"{args.peers} simulated peers in {args.processes} processes connected and ONLINE in {online:.1f} s,"
                  f" all claimable (heard from within {fresh.total_seconds():g} s) in {time.perf_counter() - t0:.1f} s"
                  f" (target: ONLINE within {TARGET_ONLINE:g} s)")
            cpu0 = {t.name: thread_cpu(t) for t in threading.enumerate()}
            results = [rounds(platform, fleet, csv, n, args.rounds) for n in sizes]
            report(results, args)
            used = {t.name: thread_cpu(t) - cpu0.get(t.name, 0.0) for t in threading.enumerate()}
            print("  CPU seconds of this process's threads over those sessions: " + ", ".join(
                f"{name} {seconds:.1f}" for name, seconds in sorted(used.items(), key=lambda x: -x[1])[:6]))
            if args.sustain > 0:
                sustained(platform, csv, args.peers, args.sustain, args.epoch_seconds)
        finally:
            if fleet is not None:
                fleet.stop()
            platform.stack.close()
    print(f"\ntotal {time.perf_counter() - began:.0f} s")


def report(results: list[dict], args: argparse.Namespace) -> None:
    print(f"\n== federated rounds, one local epoch of {args.epoch_seconds:g} s, {args.rounds} rounds per session")
    print(f"  {'peers':>5} {'dispatched (max)':>17} {'join+aggregate (max)':>21} {'coordinator CPU/round':>22}"
          f" {'per peer':>9}")
    base_cpu = results[0]["cpu_per_round"]
    for r in results:
        extra = (r["cpu_per_round"] - base_cpu) / (r["peers"] - results[0]["peers"]) if r is not results[0] else 0
        print(f"  {r['peers']:>5} {max(r['dispatch']) * 1000:14.0f} ms {max(r['join']) * 1000:18.0f} ms"
              f" {r['cpu_per_round'] * 1000:19.1f} ms {extra * 1000:6.2f} ms"
              f"   (medians {statistics.median(r['dispatch']) * 1000:.0f} / {statistics.median(r['join']) * 1000:.0f}"
              f" ms; session {r['wall']:.1f} s)")
    largest = results[-1]
    ok = max(largest["dispatch"]) <= TARGET_DISPATCH and max(largest["join"]) <= TARGET_JOIN
    print(f"  {largest['peers']} peers: dispatched <= {TARGET_DISPATCH:g} s and join + aggregate <= {TARGET_JOIN:g} s:"
          f" {'MET' if ok else 'NOT MET'}")
    if len(results) >= 3:
        small, mid, big = results[0], results[-2], results[-1]
        slope = (big["cpu_per_round"] - small["cpu_per_round"]) / (big["peers"] - small["peers"])
        early = (mid["cpu_per_round"] - small["cpu_per_round"]) / (mid["peers"] - small["peers"])
        late = (big["cpu_per_round"] - mid["cpu_per_round"]) / (big["peers"] - mid["peers"])
        print(f"  coordinator CPU per extra peer, {small['peers']} -> {big['peers']}: {slope * 1000:.2f} ms"
              f" ({small['peers']}->{mid['peers']}: {early * 1000:.2f} ms, {mid['peers']}->{big['peers']}:"
              f" {late * 1000:.2f} ms; late/early = {late / early if early > 0 else float('nan'):.2f})"
              f" target <= {TARGET_PER_PEER * 1000:g} ms, linear: {'MET' if slope <= TARGET_PER_PEER else 'NOT MET'}")


if __name__ == "__main__":
    main()
