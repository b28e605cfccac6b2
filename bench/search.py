"""Benchmark the sweep's search: TPE with successive halving against random search without early stopping.

For each dataset (scikit-learn's digits and breast_cancer) and seed, on the same space, through the real
platform as `make run` assembles it in one process (bench/federated.py's `Platform`: the API's test client,
the real coordinator and peer tasks on in-process workers over the in-memory broker, mongomock, a scratch
storage directory), with 2 peers:
(a) random search, no early stopping (`sampler=random, pruner=none`), `--random-trials` trials: its best
    held-out score and the peer-time it took (P);
(b) the product's default search (`sampler=tpe, pruner=asha`), `--trials` trials: its best-so-far held-out
    score against the peer-time spent, from its trials' rung scores (each names its task; a task's peer-time
    is its assignment's sent -> reported time, the peer's whole turn: fetch, training, uploads);
(c) the anchor: Optuna alone in this process, the same space, sampler and pruner, the trainer's loop
    reporting the same held-out score at the same rungs, `--trials` trials.
Both sessions of a seed hold out the same rows: the platform draws its secret split seed per session, which
this bench fixes to the seed (webapp.launch's `secrets.randbelow`), so their scores are on one yardstick.

Targets (issue 19): with P of peer-time, (b)'s best >= (a)'s best (mean over seeds), and (b) reaches (a)'s
best in <= 0.6 P (median over seeds; a seed where it never does counts as a miss).

Run: .venv/bin/python -m bench.search [--seeds 10] [--datasets digits,breast_cancer] [--trials 40] [--random-trials 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bson import ObjectId

from bench.federated import SCRATCH, Platform, forget, mean_sd
from harness.datasets import sklearn_csv
from models import assignment as assignments
from models import trial as trials
from models.session import TrainingSession
from trainer import search as space_
from trainer.dataset import Dataset
from trainer.loop import TrainConfig, evaluate, train
from trainer.model import ModelConfig, SimpleDNN
from trainer.normalization import fit_normalization
from trainer.split import VALIDATION_FRACTION, split_indices
from trainer.table import read_table

PEERS = 2
DATASETS = ("digits", "breast_cancer")
SPACE = {"learning_rate": {"low": 1e-4, "high": 1e-1, "log": True}, "batch_size": [16, 32, 64, 128],
         "hidden": [[32], [64], [128, 64]], "dropout": [0.0, 0.2], "epochs": 27}
TARGET_RATIO = 0.6


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    # Enough for the search to spend at least the random search's peer-time: most of its trials stop early.
    parser.add_argument("--trials", type=int, default=40, help="trials of the search (and of the Optuna anchor)")
    parser.add_argument("--random-trials", type=int, default=8, help="trials of the random search, run to the end")
    return parser.parse_args()


def search(platform: Platform, csv: Path, seed: int, trials_: int, sampler: str, pruner: str) -> str:
    """One searching sweep through the API, to its end; its id."""
    form = {"num_peers": str(PEERS), "seed": str(seed), "search": json.dumps(SPACE), "trials": str(trials_),
            "sampler": sampler, "pruner": pruner}
    with csv.open("rb") as file:
        response = platform.client.post("/sessions/start", headers=platform.auth, content_type="multipart/form-data",
                                        data={**form, "file": (file, csv.name)})
    assert response.status_code == 202, response.json
    session_id = response.json["session_id"]
    deadline = time.monotonic() + 900
    while platform.client.get(f"/sessions/{session_id}", headers=platform.auth).json["status"] in ("PENDING",
                                                                                                 "RUNNING"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"session {session_id} did not finish in 900 s")
        time.sleep(0.1)
    session = TrainingSession.objects(id=session_id).first()
    assert session.status == "COMPLETED", (session.status, session.reason)
    return session_id


def trajectory(session_id: str) -> list[tuple[float, float]]:
    """(peer-time spent so far, best held-out score so far) after each task the session's trials were scored by,
    in the order they were reported; every task's peer-time counts, scored or not."""
    session = TrainingSession.objects(id=session_id).first()
    tasks = {a["round"]: a for a in assignments.for_session(session.id)}
    turns = sorted(tasks.values(), key=lambda a: a["reported_at"] or a["sent_at"])
    score_of = {s["seq"]: s["value"] for t in trials.of_session(session.id) for s in t.get("scores", [])}
    spent, best, points = 0.0, float("-inf"), []
    for task in turns:
        if task.get("reported_at") is None:
            continue
        spent += (task["reported_at"] - task["sent_at"]).total_seconds()
        if task["round"] in score_of:
            best = max(best, score_of[task["round"]])
        points.append((spent, best))
    return points


def at_budget(points: list[tuple[float, float]], budget: float) -> float:
    """The best score reached within `budget` peer-seconds (the whole run's best if it used less)."""
    within = [best for spent, best in points if spent <= budget]
    return within[-1] if within else float("-inf")


def time_to(points: list[tuple[float, float]], value: float) -> float | None:
    """Peer-seconds until the best score reached `value` (None: never)."""
    return next((spent for spent, best in points if best >= value), None)


def optuna_anchor(csv: Path, seed: int, trials_: int) -> tuple[float, float]:
    """Optuna alone in this process on the session's split: (best held-out score, seconds)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    table = read_table(csv)
    train_rows, val_rows = split_indices(table.y, VALIDATION_FRACTION, seed=seed, stratify=True)
    data = Dataset.from_indices(table, train_rows, val_rows, fit_normalization(table.x[train_rows]))
    space = space_.parse(SPACE)
    first = space_.min_resource(space)
    rungs = set(space_.rungs(space_.max_epochs(space), first))

    def objective(trial: optuna.Trial) -> float:
        hp = space_.hyperparameters(space, {
            "learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-1, log=True),
            "batch_size": trial.suggest_categorical("batch_size", [16, 32, 64, 128]),
            "hidden": trial.suggest_categorical("hidden", [space_.encode("hidden", h) for h in SPACE["hidden"]]),
            "dropout": trial.suggest_categorical("dropout", [0.0, 0.2])})
        model = SimpleDNN(ModelConfig(len(table.features), table.output_size, tuple(hp["hidden"]), hp["dropout"],
                                      table.task), seed=seed + trial.number)
        best = float("-inf")

        def scored(metrics: Any) -> None:
            nonlocal best
            if metrics.epoch in rungs:
                value = evaluate(model, data.val_x, data.val_y)["accuracy"]
                best = max(best, value)
                trial.report(value, metrics.epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()

        train(model, data.train_x, data.train_y, TrainConfig(
            batch_size=hp["batch_size"], epochs=hp["epochs"], learning_rate=hp["learning_rate"],
            seed=seed + trial.number, num_threads=1), on_epoch_end=scored)
        return best

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=max(PEERS, min(10, trials_ // 3))),
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=space_.REDUCTION))
    began = time.perf_counter()
    study.optimize(objective, n_trials=trials_)
    seconds = time.perf_counter() - began
    best = max((t.value if t.value is not None else max(t.intermediate_values.values(), default=float("-inf")))
               for t in study.trials)
    return best, seconds


def bench_dataset(platform: Platform, name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    import webapp.launch

    csv = sklearn_csv(SCRATCH / f"{name}.csv", name)
    rows = []
    for seed in range(args.seeds):
        # The two sessions of a seed hold out the same rows (see the docstring).
        webapp.launch.secrets.randbelow = lambda _n, seed=seed: seed
        random = search(platform, csv, seed, args.random_trials, "random", "none")
        searched = search(platform, csv, seed, args.trials, "tpe", "asha")
        r_points, s_points = trajectory(random), trajectory(searched)
        budget, r_best = r_points[-1][0], r_points[-1][1]
        s_best, s_spent = at_budget(s_points, budget), s_points[-1][0]
        reached = time_to(s_points, r_best)
        pruned = sum(t["status"] == trials.PRUNED for t in trials.of_session(ObjectId(searched)))
        forget(random, searched)
        anchor, anchor_seconds = optuna_anchor(csv, seed, args.trials)
        row = {"dataset": name, "seed": seed, "random_best": r_best, "random_seconds": budget,
               "search_best": s_best, "search_final": s_points[-1][1], "search_seconds": s_spent,
               "ratio": reached / budget if reached is not None else None, "pruned": pruned,
               "anchor_best": anchor, "anchor_seconds": anchor_seconds}
        rows.append(row)
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "never"
        print(f"  {name} seed {seed}: random {r_best * 100:.2f}% in {budget:.1f} peer-s | search {s_best * 100:.2f}% "
              f"within it ({row['search_final'] * 100:.2f}% after {s_spent:.1f} peer-s, {row['pruned']} of "
              f"{args.trials} pruned) reached random's best at {ratio} of its peer-time | Optuna alone "
              f"{anchor * 100:.2f}% in {anchor_seconds:.1f} s", flush=True)
    return rows


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the peers' grant requests, one line each
    started = datetime.now()
    print(f"bench.search: {PEERS} peers, space {json.dumps(SPACE)}; random {args.random_trials} trials (no early "
          f"stopping) vs TPE + successive halving {args.trials} trials; seeds 0..{args.seeds - 1}", flush=True)
    platform = Platform(PEERS)
    try:
        rows = [row for name in args.datasets.split(",") for row in bench_dataset(platform, name, args)]
    finally:
        platform.close()
    print()
    verdicts = []
    for name in args.datasets.split(","):
        mine = [r for r in rows if r["dataset"] == name]
        gains = [(r["search_best"] - r["random_best"]) * 100 for r in mine]
        ratios = [r["ratio"] if r["ratio"] is not None else float("inf") for r in mine]
        median = statistics.median(ratios)
        anchor = [(r["search_final"] - r["anchor_best"]) * 100 for r in mine]
        speed = [r["search_seconds"] / r["anchor_seconds"] for r in mine]
        ok = statistics.mean(gains) >= 0 and median <= TARGET_RATIO
        verdicts.append(ok)
        print(f"{name}: search - random at equal peer-time {mean_sd(gains)} points; peer-time to reach random's best "
              f"median {median:.2f} of random's (target <= {TARGET_RATIO}); search - Optuna alone {mean_sd(anchor)} "
              f"points, peer-time / Optuna's time {statistics.median(speed):.2f}x (median) "
              f"[{'met' if ok else 'MISSED'}]")
    verdict = "all targets met" if all(verdicts) else "MISSED"
    print(f"took {(datetime.now() - started).total_seconds():.0f} s; {verdict}")


if __name__ == "__main__":
    main()
