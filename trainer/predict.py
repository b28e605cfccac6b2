"""Command line: `python -m trainer.predict MODEL.safetensors DATA.csv` prints one prediction per row."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from trainer.errors import DatasetError
from trainer.predictor import Predictor
from trainer.weights import WeightsError


def main(argv: Sequence[str] | None = None) -> int:
    """Print a prediction per data row; exit 2 with a message on a bad model or dataset."""
    parser = argparse.ArgumentParser(prog="python -m trainer.predict", description=__doc__)
    parser.add_argument("model", help="a checkpoint written by `python -m trainer --out`")
    parser.add_argument("data", help="CSV with the model's feature columns (the target column may be absent)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    try:
        predictor = Predictor.load(args.model)
        predictions = predictor.predict_csv(args.data)
    except (DatasetError, WeightsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    sys.stdout.write("".join(f"{value}\n" for value in predictions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
