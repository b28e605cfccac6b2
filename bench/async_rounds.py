"""Benchmark asynchronous against synchronous federated rounds when one peer is five times slower.

The tabular job of issue 13 (bench/rounds.py): 20,000 rows x 40 features, 7 classes, 3 IID shards, an
MLP 128-64, 2 local epochs per task; the synchronous run has 5 rounds, the asynchronous one the same
peer-epochs (max_updates = 5 x 3 tasks). One peer takes 5x as long per epoch.

Every task really trains (trainer.loop.train on the peer's shard from the global weights it was given),
and every fold is the coordinator's own (trainer.staleness.fold with FedAvg, as tasks/buffered.py folds),
evaluated on the held-out rows. Time is a clock the bench keeps: a task lasts its measured training
time, times 5 for the slow peer; a synchronous round lasts its slowest task plus its measured
aggregation; an asynchronous peer's next task starts when its update was folded. That keeps the
comparison about the schedule, not about three trainings sharing 2 cores (they would blur each other);
the mechanism on the real broker is tests/e2e/test_async.py's.

Printed: the synchronous run's final accuracy A and time T; the asynchronous run's time to reach A
(ratio to T: target <= 0.5) and its final accuracy (target: within 1 point of A), per seed and mean.

Run: .venv/bin/python bench/async_rounds.py [--seeds 10] [--buffer-size 2] [--slowdown 5]
"""

from __future__ import annotations

import argparse
import heapq
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.aggregation import average  # noqa: E402
from trainer.loop import TrainConfig, evaluate, train  # noqa: E402
from trainer.model import ModelConfig, SimpleDNN  # noqa: E402
from trainer.normalization import fit_normalization  # noqa: E402
from trainer.split import VALIDATION_FRACTION, shard, split_indices  # noqa: E402
from trainer.staleness import Contribution, fold  # noqa: E402

PEERS, ROUNDS, LOCAL_EPOCHS = 3, 5, 2
TARGET_TIME, TARGET_POINTS = 0.5, 1.0


@dataclass
class Job:
    shards: list[tuple[np.ndarray, np.ndarray]]
    val: tuple[np.ndarray, np.ndarray]
    config: ModelConfig
    seed: int


def job(seed: int) -> Job:
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=20_000, n_features=40, n_informative=24, n_redundant=8, n_classes=7,
                               class_sep=1.0, random_state=seed)
    x, y = x.astype(np.float32), y.astype(np.int64)
    train_rows, val_rows = split_indices(y, VALIDATION_FRACTION, seed=seed, stratify=True)
    norm = fit_normalization(x[train_rows])
    x = norm.apply(x)
    parts = shard(train_rows, y, PEERS, "iid", seed=seed)
    return Job([(x[p], y[p]) for p in parts], (x[val_rows], y[val_rows]),
               ModelConfig(40, 7, (128, 64), 0.0, "classification"), seed)


def local(j: Job, peer: int, start: dict[str, torch.Tensor], task: int) -> tuple[dict[str, torch.Tensor], float]:
    """One task: LOCAL_EPOCHS on the peer's shard from `start`; its weights and its training seconds."""
    model = SimpleDNN(j.config)
    x, y = j.shards[peer]
    began = time.perf_counter()
    train(model, x, y, TrainConfig(batch_size=64, epochs=LOCAL_EPOCHS, learning_rate=0.001, seed=j.seed + task,
                                   num_threads=1), initial_state=start)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, time.perf_counter() - began


def accuracy(j: Job, state: dict[str, torch.Tensor]) -> float:
    model = SimpleDNN(j.config)
    model.load_state_dict(state)
    return evaluate(model, *j.val)["accuracy"]


def synchronous(j: Job, slow: float) -> list[tuple[float, float]]:
    """(clock, accuracy) after each round."""
    state = SimpleDNN(j.config, seed=j.seed).state_dict()
    clock, curve = 0.0, []
    for r in range(ROUNDS):
        results = [local(j, p, state, r * PEERS + p) for p in range(PEERS)]
        began = time.perf_counter()
        state = average([s for s, _ in results], [len(j.shards[p][1]) for p in range(PEERS)])
        acc = accuracy(j, state)
        clock += max(seconds * (slow if p == 0 else 1.0) for p, (_, seconds) in enumerate(results))
        clock += time.perf_counter() - began
        curve.append((clock, acc))
    return curve


def asynchronous(j: Job, slow: float, buffer_size: int) -> list[tuple[float, float]]:
    """(clock, accuracy) after each fold."""
    versions = [SimpleDNN(j.config, seed=j.seed).state_dict()]
    budget, sent = ROUNDS * PEERS, 0
    out: list[tuple[float, int, int, int]] = []  # (finishes at, task, peer, base version)
    weights: dict[int, tuple[dict[str, torch.Tensor], int]] = {}
    buffer: list[tuple[int, int, int]] = []  # (task, peer, base version)
    curve = []

    def send(peer: int, at: float) -> None:
        nonlocal sent
        task, base = sent, len(versions) - 1
        sent += 1
        state, seconds = local(j, peer, versions[base], task)
        weights[task] = (state, base)
        heapq.heappush(out, (at + seconds * (slow if peer == 0 else 1.0), task, peer, base))

    for p in range(PEERS):
        send(p, 0.0)
    while out:
        at, task, peer, base = heapq.heappop(out)
        buffer.append((task, peer, base))
        if len(buffer) >= buffer_size or (sent >= budget and not out):
            began = time.perf_counter()
            current = len(versions) - 1
            contributions = [Contribution(versions[b], weights[t][0], len(j.shards[p][1]), current - b)
                             for t, p, b in buffer]
            versions.append(fold(versions[current], contributions))
            buffer.clear()
            at += time.perf_counter() - began
            curve.append((at, accuracy(j, versions[-1])))
        if sent < budget:
            send(peer, at)
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--buffer-size", type=int, default=2, help="the platform's default for 3 peers")
    parser.add_argument("--slowdown", type=float, default=5.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{PEERS} peers (peer 0 {args.slowdown:g}x slower), {ROUNDS} rounds x {LOCAL_EPOCHS} local epochs sync; "
          f"async: {ROUNDS * PEERS} tasks, buffer_size {args.buffer_size}")
    print("seed | sync acc  time s | async: time to sync acc  ratio | async final acc  gap (points)")
    ratios, gaps = [], []
    for seed in range(args.seeds):
        j = job(seed)
        local(j, 0, SimpleDNN(j.config).state_dict(), 0)  # torch's first-use costs, outside the clock
        sync = synchronous(j, args.slowdown)
        apart = asynchronous(j, args.slowdown, args.buffer_size)
        target, total = sync[-1][1], sync[-1][0]
        reached = next((t for t, acc in apart if acc >= target), None)
        ratio = reached / total if reached is not None else float("inf")
        gap = 100 * (apart[-1][1] - target)
        ratios.append(ratio)
        gaps.append(gap)
        shown = f"{reached:6.2f}" if reached is not None else " never"
        print(f"{seed:4d} | {target:.4f}  {total:6.2f} | {shown}  {ratio:5.2f}x | {apart[-1][1]:.4f}  {gap:+.2f}")
    reached = [r for r in ratios if r != float("inf")]
    median_ratio, mean_gap = statistics.median(ratios), statistics.mean(gaps)
    print(f"time to the sync run's final accuracy: median {median_ratio:.2f}x sync, reached in {len(reached)} of "
          f"{len(ratios)} seeds (at most {max(reached, default=float('inf')):.2f}x where reached; target <= "
          f"{TARGET_TIME}x: {'met' if median_ratio <= TARGET_TIME else 'NOT met'} at the median)")
    print(f"final accuracy: {mean_gap:+.2f} points vs sync on average (sd {statistics.pstdev(gaps):.2f}; "
          f"target within {TARGET_POINTS:g}: {'met' if mean_gap >= -TARGET_POINTS else 'NOT met'})")


if __name__ == "__main__":
    main()
