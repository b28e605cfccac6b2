"""Command line: `python -m trainer DATA.csv [options]` trains a SimpleDNN locally, one line per epoch."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from trainer.dataset import Dataset, prepare
from trainer.errors import DatasetError
from trainer.loop import OPTIMIZERS, EpochMetrics, TrainConfig, TrainingError, evaluate, resolve_device, train
from trainer.model import TASKS, ModelConfig, SimpleDNN
from trainer.table import read_table
from trainer.weights import Checkpoint, save_checkpoint


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer sizes like 128,64; got {text!r}"
        ) from None
    if any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"layer sizes must be positive; got {text!r}")
    return sizes


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    parser.add_argument("data", help="CSV file with a header line")
    parser.add_argument("--target", default="label", help="target column (default: label)")
    parser.add_argument(
        "--features",
        type=_names,
        default=None,
        help="comma-separated feature columns (default: every column but the target)",
    )
    parser.add_argument("--task", choices=TASKS, default="classification")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 0.001)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds the split, the initial weights and the batches"
    )
    parser.add_argument(
        "--hidden", type=_sizes, default=(128, 64), help="hidden layer sizes (default: 128,64)"
    )
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="rows held out for validation (default: 0.2; 0 trains on every row)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: all cores; use cores / trainings when several run on one machine)",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("--out", default=None, help="save the trained model to this .safetensors file")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object (history, final) instead of lines"
    )
    return parser


def _epoch_line(m: EpochMetrics) -> str:
    parts = [f"epoch {m.epoch:>{len(str(m.epochs))}}/{m.epochs}", f"loss {m.loss:.4f}"]
    if m.accuracy is not None:
        parts.append(f"acc {m.accuracy:.4f}")
    if m.val_loss is not None:
        parts.append(f"val_loss {m.val_loss:.4f}")
    if m.val_accuracy is not None:
        parts.append(f"val_acc {m.val_accuracy:.4f}")
    if m.val_r2 is not None:
        parts.append(f"val_r2 {m.val_r2:.4f}")
    parts += [f"{m.samples_per_sec:,.0f} samples/s", f"{m.seconds:.2f} s"]
    return "  ".join(parts)


def _final(model: SimpleDNN, data: Dataset) -> dict[str, Any]:
    """Metrics on the validation rows (on the training rows when none were held out)."""
    held_out = len(data.val_index) > 0
    x, y = (data.val_x, data.val_y) if held_out else (data.train_x, data.train_y)
    final: dict[str, Any] = {"split": "validation" if held_out else "training", **evaluate(model, x, y)}
    target_std = data.normalization.target_std
    if target_std is not None and final.get("loss") is not None:
        final["rmse"] = math.sqrt(final["loss"]) * target_std  # in the target's own units
    return final


def main(argv: Sequence[str] | None = None) -> int:
    """Train from the command line; exit 2 on a bad dataset or option, 1 if training diverges."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = TrainConfig(
            batch_size=args.batch_size,
            epochs=args.epochs,
            learning_rate=args.lr,
            optimizer=args.optimizer,
            seed=args.seed,
            device=args.device,
            num_threads=args.threads,
        )
        resolve_device(args.device)
        ModelConfig(
            input_size=1, output_size=2, hidden=args.hidden, dropout=args.dropout
        )  # checks the options
    except ValueError as error:
        parser.error(str(error))
    try:
        table = read_table(args.data, target=args.target, features=args.features, task=args.task)
        data = prepare(table, validation_fraction=args.val_fraction, seed=args.seed)
        config = ModelConfig(
            input_size=len(table.features),
            output_size=table.output_size,
            hidden=args.hidden,
            dropout=args.dropout,
            task=table.task,
        )
        model = SimpleDNN(config, seed=args.seed)
        result = train(
            model,
            data.train_x,
            data.train_y,
            settings,
            data.val_x,
            data.val_y,
            on_epoch_end=None if args.json else lambda m: print(_epoch_line(m), flush=True),
        )
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    model = result.model.cpu()
    final = _final(model, data)
    history = [m.to_dict() for m in result.history]
    if args.out:
        save_checkpoint(
            args.out,
            model,
            Checkpoint(
                config=config,
                features=table.features,
                target=table.target,
                classes=table.classes,
                normalization=data.normalization,
                metadata={
                    "history": history,
                    "final": final,
                    "train": settings.to_dict(),
                    "rows": table.rows,
                },
            ),
        )
    if args.json:
        print(
            json.dumps(
                {
                    "history": history,
                    "final": final,
                    "classes": table.classes,
                    "features": table.features,
                    "rows": {"train": len(data.train_index), "validation": len(data.val_index)},
                    "out": args.out,
                }
            )
        )
    else:
        metric = "accuracy" if "accuracy" in final else "r2"
        value = final.get(metric)
        print(
            f"{final['split']}: loss {final['loss']:.4f}  {metric} "
            f"{'n/a' if value is None else f'{value:.4f}'}  ({final['samples']} rows)"
        )
        if args.out:
            print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
