"""Training: one loop (loop.py) over two engines (single.py, stacked.py)."""

from mdlgrok.training.loop import ENGINES, TrainingFailed, log_epochs, train, train_runs

__all__ = ["ENGINES", "TrainingFailed", "log_epochs", "train", "train_runs"]
