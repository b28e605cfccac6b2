"""Train a SimpleDNN on a CSV: torch-free datasets (`trainer.table`), model, loop, weights and a CLI."""

# Import nothing here: the web API imports `trainer.table` and must never load torch.
