"""Benchmark screening on a sample of the held-out rows against screening on all of them: do the verdicts hold?

Screening (trainer/screening.py) costs a federated round four forward passes over the held-out rows, the largest
piece of a round's overhead on the 20,000 x 40 job (4,000 held-out rows). Measuring the loss on a sample would
cut it in proportion, if the verdicts stayed the same. This bench trains the job's three peers with the product's
own loop (`trainer.loop.train`, 2 local epochs a round, FedAvg between rounds) and screens every round's honest
updates with the product's `screening.screen` on all the held-out rows, then on random samples of them: how often
the set of refused updates differs (a refusal is a verdict on a peer), and how far each update's measured cost
moves (the bar it must stay under is 5% of the loss at least).

Run: .venv/bin/python -m bench.screening [--alpha 0.1] [--rounds 8] [--draws 10]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from sklearn.datasets import make_classification

from trainer import screening
from trainer.loop import TrainConfig, evaluate, train
from trainer.model import ModelConfig, SimpleDNN
from trainer.split import shard
from trainer.weights import average

SAMPLES = (2048, 1024, 512)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpha", type=float, default=0.0, help="label skew (Dirichlet α); 0: an even split")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--draws", type=int, default=10, help="samples drawn per round and size")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y = make_classification(n_samples=20_000, n_features=40, n_informative=24, n_redundant=8, n_classes=7,
                               n_clusters_per_class=1, random_state=0)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    held_out, rows = order[:4000], order[4000:]
    parts = shard(rows, y, 3, "label_skew" if args.alpha else "iid", alpha=args.alpha or 0.5, seed=1)
    config = ModelConfig(40, 7, (128, 64), 0.0, "classification")
    model, current = SimpleDNN(config).eval(), SimpleDNN(config, seed=0).state_dict()

    def loss_on(chosen: np.ndarray):
        return lambda state: (model.load_state_dict(state), evaluate(model, x[chosen], y[chosen])["loss"])[1]

    differ = {n: 0 for n in SAMPLES}
    moved: dict[int, list[float]] = {n: [] for n in SAMPLES}
    screenings = 0
    for round_ in range(args.rounds):
        states = {}
        for i, part in enumerate(parts):
            trained = train(SimpleDNN(config, seed=0), x[part], y[part],
                            TrainConfig(batch_size=64, epochs=2, learning_rate=0.003, seed=10 * round_ + i),
                            initial_state=current)
            states[f"peer {i}"] = {k: v.clone() for k, v in trained.model.state_dict().items()}
        full = screening.screen(current, states, loss_on(held_out))
        for n in SAMPLES:
            for draw in range(args.draws):
                sample = np.random.default_rng(1000 * round_ + draw).choice(held_out, n, replace=False)
                found = screening.screen(current, states, loss_on(sample))
                differ[n] += set(found.rejected) != set(full.rejected)
                moved[n] += [abs(found.gains[k] - full.gains[k]) for k in full.gains if k in found.gains]
        screenings += args.draws
        print(f"round {round_ + 1}: all 4,000 rows refuse {sorted(full.rejected) or 'none'}; costs "
              + ", ".join(f"{k} {100 * v:+.1f}%" for k, v in full.gains.items()), flush=True)
        current = average([states[k] for k in sorted(states)], [len(p) for p in parts])
    print(f"\nlabel skew α {args.alpha or 'none (even split)'}; {screenings} screenings per sample size")
    for n in SAMPLES:
        ordered = sorted(moved[n])
        print(f"  {n:>5} of 4,000 rows: verdicts differ in {differ[n]}/{screenings}; an update's cost moves by "
              f"median {100 * statistics.median(ordered):.1f} points of the loss, p95 "
              f"{100 * ordered[int(0.95 * (len(ordered) - 1))]:.1f} (the bar: ≥ 5)")


if __name__ == "__main__":
    main()
