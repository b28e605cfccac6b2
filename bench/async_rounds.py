"""Benchmark asynchronous against synchronous federated sessions when one peer is five times slower.

The platform's own code end to end (harness/platform.py on embedded.py): the API starts each session,
the coordinator runs it with its real strategies (`SyncFederated`, `AsyncFederated`), and three real
peers train on the in-memory broker, in this process. One of them is a straggler: its `train` task is
the real one, and it hands its result in only after (slowdown - 1) x its own training time more (as a
machine five times slower would). The job is the round benches' tabular one (harness/datasets.py:
20,000 rows x 40 features, 7 classes, 3 IID shards), an MLP 128-64, 2 local epochs per task; the
synchronous session has 5 rounds, the asynchronous one the same peer-epochs (max_updates = 5 x 3).

Each pair of sessions runs on the same platform, one after the other, so both pay the same machine.
Times are the sessions' own records: a synchronous round's `finished_at`, an asynchronous version's
`seconds` after the session started. Printed per seed: the synchronous run's final held-out accuracy A
and its time T; the time the asynchronous run first reached A (ratio to T, target <= 0.5) and its final
accuracy (target: within 1 point of A).

Run: .venv/bin/python -m bench.async_rounds [--seeds 5] [--buffer-size 2] [--slowdown 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.datasets import tabular_csv
from harness.platform import Served
from harness.waiting import wait_until
from models import peer as peers
from settings import Settings

PEERS, ROUNDS, LOCAL_EPOCHS = 3, 5, 2
TARGET_TIME, TARGET_POINTS = 0.5, 1.0
HP = {"learning_rate": 0.001, "batch_size": 64, "hidden": [128, 64]}


def straggler(slowdown: float) -> Any:
    """A third peer's `train`: the real one, reporting `slowdown` times later."""

    def around(honest: Any) -> Any:
        def slow(spec: dict[str, Any]) -> dict[str, Any]:
            result = honest(spec)
            time.sleep((slowdown - 1) * result.get("seconds", 0.0))
            return result

        return slow

    return around


def run(api: Any, csv: Path, seed: int, **form: Any) -> dict[str, Any]:
    with csv.open("rb") as file:
        response = api.post("/sessions/start", files={"file": (csv.name, file, "text/csv")},
                            data={"num_peers": PEERS, "mode": "federated", "local_epochs": LOCAL_EPOCHS,
                                  "seed": seed, "hyperparameters": json.dumps(HP), **form})
    assert response.status_code == 202, response.text
    session = api.wait_finished(response.json()["session_id"], timeout=600)
    assert session["status"] == "COMPLETED", session["reason"]
    return session


def curve(session: dict[str, Any], asynchronous: bool) -> list[tuple[float, float]]:
    """(seconds since the session started, held-out accuracy) after each round or fold."""
    from datetime import datetime

    started = datetime.fromisoformat(session["started_at"])
    points = []
    for r in session["rounds"]:
        at = r["metrics"]["seconds"] if asynchronous else (
            datetime.fromisoformat(r["finished_at"]) - started).total_seconds()
        points.append((at, r["metrics"]["val_accuracy"]))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--buffer-size", type=int, default=2, help="the platform's default for 3 peers")
    parser.add_argument("--slowdown", type=float, default=5.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="peertrain-bench-async-") as scratch:
        settings = Settings.from_env({
            "STORAGE_URL": str(Path(scratch) / "storage"), "MONGODB_URI": "mongomock://localhost/bench-async",
            "PEERTRAIN_ENV": "development", "JWT_SECRET_KEY": "bench-secret-that-is-long-enough-for-hs256",
            "BCRYPT_ROUNDS": "4", "PEER_THREADS": "1", "LOG_LEVEL": "WARNING", "DATA_DIR": ""})
        served = Served(settings, Path(scratch), peers=["fast1", "fast2"]).start()
        try:
            served.start_peer_here("slow", straggler(args.slowdown))
            wait_until(lambda: peers.Peer.objects(status=peers.ONLINE).count() == PEERS, 60, "every peer ONLINE")
            api = served.user("bench")
            csv = tabular_csv(Path(scratch) / "tabular.csv")
            print(f"{PEERS} peers (one {args.slowdown:g}x slower), {ROUNDS} rounds x {LOCAL_EPOCHS} local epochs "
                  f"sync; async: {ROUNDS * PEERS} tasks, buffer_size {args.buffer_size}; the platform's own "
                  "coordinator and peers, in-memory broker")
            print("seed | sync acc  time s | async: time to sync acc  ratio | to within 1 point  ratio "
                  "| async final acc  gap (points)")
            ratios, near, gaps = [], [], []
            for seed in range(args.seeds):
                sync = curve(run(api, csv, seed, rounds=ROUNDS), asynchronous=False)
                apart = curve(run(api, csv, seed, schedule="async", rounds=ROUNDS, buffer_size=args.buffer_size,
                                  max_updates=ROUNDS * PEERS), asynchronous=True)
                target, total = sync[-1][1], sync[-1][0]
                reached = next((t for t, acc in apart if acc >= target), None)
                close = next((t for t, acc in apart if acc >= target - TARGET_POINTS / 100), None)
                ratio = reached / total if reached is not None else float("inf")
                near.append(close / total if close is not None else float("inf"))
                gap = 100 * (apart[-1][1] - target)
                ratios.append(ratio)
                gaps.append(gap)
                shown = f"{reached:6.2f}" if reached is not None else " never"
                shown_close = f"{close:6.2f}" if close is not None else " never"
                print(f"{seed:4d} | {target:.4f}  {total:6.2f} | {shown}  {ratio:5.2f}x | {shown_close}  "
                      f"{near[-1]:5.2f}x | {apart[-1][1]:.4f}  {gap:+.2f}", flush=True)
        finally:
            served.stop()
    reached = [r for r in ratios if r != float("inf")]
    median_ratio, mean_gap = statistics.median(ratios), statistics.mean(gaps)
    print(f"time to the sync run's final accuracy: median {median_ratio:.2f}x sync, reached in {len(reached)} of "
          f"{len(ratios)} seeds (at most {max(reached, default=float('inf')):.2f}x where reached; target <= "
          f"{TARGET_TIME}x: {'met' if median_ratio <= TARGET_TIME else 'NOT met'} at the median)")
    print(f"time to within {TARGET_POINTS:g} point of it: median {statistics.median(near):.2f}x sync")
    print(f"final accuracy: {mean_gap:+.2f} points vs sync on average (sd {statistics.pstdev(gaps):.2f}; "
          f"target within {TARGET_POINTS:g}: {'met' if mean_gap >= -TARGET_POINTS else 'NOT met'})")


if __name__ == "__main__":
    main()
