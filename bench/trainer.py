"""Benchmark trainer/: training throughput against two reference loops, CSV loading, and CPU threads.

Run: .venv/bin/python -m bench.trainer [--quick] [--rounds N] [--threads N] [--only loops|csv|threads]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from trainer.loop import TrainConfig, train
from trainer.memory import keep_freed_memory
from trainer.model import ModelConfig, SimpleDNN
from trainer.table import read_table

FEATURES, CLASSES, BATCH = 784, 10, 64
CONFIG = ModelConfig(input_size=FEATURES, output_size=CLASSES, hidden=(128, 64))


def generate(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features k/10000 (so the CSV holds them exactly), labels 0-9, and the codes k."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, size=rows, dtype=np.int64)
    # a class-dependent offset on the first 10 features, so the task is learnable
    codes = rng.integers(0, 9_000, size=(rows, FEATURES), dtype=np.int64)
    codes[np.arange(rows), y] += 999
    x = (codes / 10_000).astype(np.float32)
    return x, y, codes


def write_csv(path: str, codes: np.ndarray, y: np.ndarray) -> None:
    """Write "0.dddd" cells and the label, built as bytes with numpy (pandas' to_csv takes ~40 s here)."""
    rows, columns = codes.shape
    line = np.empty((rows, columns * 7 + 2), dtype=np.uint8)  # "0.dddd," per cell, then "L\n"
    cells = line[:, : columns * 7].reshape(rows, columns, 7)
    cells[..., 0], cells[..., 1], cells[..., 6] = ord("0"), ord("."), ord(",")
    for place, divisor in enumerate((1000, 100, 10, 1)):
        cells[..., 2 + place] = ord("0") + codes // divisor % 10
    line[:, -2] = ord("0") + y
    line[:, -1] = ord("\n")
    with open(path, "wb") as file:
        file.write((",".join(f"p{i}" for i in range(columns)) + ",label\n").encode())
        file.write(line.tobytes())


def ours(x: np.ndarray, y: np.ndarray, threads: int) -> float:
    """trainer.loop.train for one epoch; samples/s over the whole call."""
    model = SimpleDNN(CONFIG, seed=0)
    start = time.perf_counter()
    train(model, x, y, TrainConfig(batch_size=BATCH, epochs=1, num_threads=threads))
    return len(x) / (time.perf_counter() - start)


def original(x: torch.Tensor, y: torch.Tensor, threads: int) -> float:
    """The original system's loop: DataLoader over a TensorDataset, .item() every batch."""
    torch.manual_seed(0)
    model = SimpleDNN(CONFIG, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss()
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)
    start = time.perf_counter()
    running, correct = 0.0, 0
    for xb, yb in loader:
        optimizer.zero_grad()
        output = model(xb)
        loss = criterion(output, yb)
        loss.backward()
        optimizer.step()
        running += loss.item()
        correct += (output.argmax(1) == yb).sum().item()
    return len(x) / (time.perf_counter() - start)


def tight(x: torch.Tensor, y: torch.Tensor, threads: int) -> float:
    """A tight hand-written loop: slices of tensors shuffled once per epoch, one sync at the end."""
    model = SimpleDNN(CONFIG, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    order = torch.randperm(len(x), generator=generator)
    xs, ys = x[order], y[order]
    total = torch.zeros(())
    for i in range(0, len(x), BATCH):
        loss = F.cross_entropy(model(xs[i : i + BATCH]), ys[i : i + BATCH])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
    total.item()
    return len(x) / (time.perf_counter() - start)


def bench_loops(rows: int, rounds: int, threads: int) -> None:
    print(
        f"\n== training: {rows:,} x {FEATURES} float32, {CLASSES} classes, batch {BATCH}, Adam, MLP 128-64, "
        f"{threads} thread(s), 1 epoch per run, {rounds} rounds in rotating order =="
    )
    torch.set_num_threads(threads)
    x, y, _ = generate(rows)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    runs: dict[str, Callable[[], float]] = {
        "ours (trainer.loop.train)": lambda: ours(x, y, threads),
        "original-style (DataLoader, .item())": lambda: original(xt, yt, threads),
        "tight raw loop (pre-shuffled slices)": lambda: tight(xt, yt, threads),
    }
    for run in runs.values():  # warm-up: first calls pay for allocations and kernel selection
        run()
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            speeds[name].append(runs[name]())
    for name, values in speeds.items():
        print(f"  {name:40s} median {statistics.median(values):>9,.0f} samples/s   best {max(values):>9,.0f}")
    mine, old, raw = (statistics.median(speeds[name]) for name in names)
    print(f"  ratio ours / tight    = {mine / raw:.2f}x  (target >= 1.0)")
    print(f"  ratio ours / original = {mine / old:.2f}x  (target >= 1.2)")


def _csv_times(path: str, rounds: int, keep: bool, results: multiprocessing.Queue) -> None:
    """In a fresh process: read_table and pandas.read_csv of `path`, alternating, under one allocator setting."""
    if keep:
        keep_freed_memory()
    read_table(path)  # warm-up for both: imports, and the first touch of the memory each needs
    pd.read_csv(path)
    times: dict[str, list[float]] = {"read_table": [], "pandas.read_csv": []}
    for r in range(rounds):
        order = ["read_table", "pandas.read_csv"][:: 1 if r % 2 == 0 else -1]
        for name in order:
            start = time.perf_counter()
            read_table(path) if name == "read_table" else pd.read_csv(path)
            times[name].append(time.perf_counter() - start)
    results.put(times)


def bench_csv(rows: int, rounds: int) -> None:
    x, y, codes = generate(rows)
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "data.csv")
        write_csv(path, codes, y)
        del codes
        size = os.path.getsize(path) / 1e6
        print(f"\n== CSV loading: {rows:,} rows x {FEATURES + 1} columns, {size:.0f} MB, {rounds} rounds ==")
        table = read_table(path)
        assert np.array_equal(table.x, x) and np.array_equal(table.y, y), "read_table changed the data"
        del table, x, y
        # Each allocator setting in its own process: glibc's settings cannot be undone, and a process
        # that gave its memory back to the system pays the page faults again on the next read.
        for keep, label in ((False, "glibc default (freed memory returned)"),
                            (True, "freed memory kept, as peers run (trainer.memory.keep_freed_memory)")):
            results = context.Queue()
            child = context.Process(target=_csv_times, args=(path, rounds, keep, results))
            child.start()
            times = results.get(timeout=1200)
            child.join()
            print(f"  {label}:")
            for name, values in times.items():
                runs = " ".join(f"{v:.2f}" for v in values)
                middle = statistics.median(values)
                print(f"    {name:16s} median {middle:6.2f} s   best {min(values):6.2f} s   runs {runs}")
            ratio = statistics.median(times["read_table"]) / statistics.median(times["pandas.read_csv"])
            best = min(times["read_table"]) / min(times["pandas.read_csv"])
            print(f"    ratio read_table / pandas.read_csv = {ratio:.2f}x median, {best:.2f}x best  (target <= 1.1)")


def _peer(
    threads: int, rows: int, barrier: multiprocessing.synchronize.Barrier, results: multiprocessing.Queue
) -> None:
    x, y, _ = generate(rows, seed=threads)
    train(
        SimpleDNN(CONFIG), x[:BATCH], y[:BATCH], TrainConfig(epochs=1, num_threads=threads)
    )  # one-off imports
    model = SimpleDNN(CONFIG, seed=0)
    barrier.wait()
    result = train(model, x, y, TrainConfig(batch_size=BATCH, epochs=1, num_threads=threads))
    results.put(result.samples / result.seconds)


def bench_threads(rows: int) -> None:
    cores = os.cpu_count() or 1
    print(f"\n== two trainings at once on {cores} cores ({rows:,} rows each, 1 epoch, separate processes) ==")
    context = multiprocessing.get_context("spawn")  # fork after torch started its thread pool can hang
    for threads in (cores, 1):
        barrier, results = context.Barrier(2), context.Queue()
        peers = [context.Process(target=_peer, args=(threads, rows, barrier, results)) for _ in range(2)]
        for peer in peers:
            peer.start()
        speeds = [results.get(timeout=600) for _ in peers]
        for peer in peers:
            peer.join()
        print(
            f"  {threads} thread(s) each: "
            + ", ".join(f"{s:,.0f}" for s in speeds)
            + f" samples/s  (sum {sum(speeds):,.0f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test, not a measurement")
    parser.add_argument(
        "--rounds", type=int, default=None, help="repeats per measurement (default 5, quick 2)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads for the loop comparison (default: all cores)"
    )
    parser.add_argument(
        "--only", choices=("loops", "csv", "threads"), default=None, help="run one of the three parts"
    )
    args = parser.parse_args()
    rows = 6_000 if args.quick else 60_000
    rounds = args.rounds or (2 if args.quick else 6)
    threads = args.threads or torch.get_num_threads()
    print(
        f"torch {torch.__version__}, numpy {np.__version__}, pandas {pd.__version__}, {os.cpu_count()} cores"
    )
    if args.only in (None, "loops"):
        bench_loops(rows, rounds, threads)
    if args.only in (None, "csv"):
        bench_csv(rows, max(rounds, 9))
    if args.only in (None, "threads"):
        bench_threads(2_000 if args.quick else 20_000)


if __name__ == "__main__":
    main()
