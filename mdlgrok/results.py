"""Run folders and tidy tables.

A run folder holds ``config.json`` (the resolved config), ``env.json`` (versions),
``status.json`` (running, complete or failed, with the reason), ``checkpoints/`` and
``metrics.parquet``: one row per (run_id, epoch, step, metric, value, eps, codec).
Every write is atomic (temporary file, then rename), so a run killed at any moment leaves
each earlier row and checkpoint readable.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import torch

# DESIGN.md's columns, plus `estimator` ("mdlgrok" or "paper" on complexity rows, else empty).
COLUMNS = ["run_id", "epoch", "step", "metric", "value", "eps", "codec", "estimator"]
METRICS_FILE = "metrics.parquet"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely (missing, truncated, not a checkpoint)."""


class RunExistsError(ValueError):
    """--out already holds a run and --resume was not asked for."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary file beside path, then rename it over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def row(run_id: str, epoch: int, step: int, metric: str, value: float, eps: float = float("nan"), codec: str = "",
        estimator: str = "") -> dict:
    """One tidy metric row."""
    return {"run_id": run_id, "epoch": int(epoch), "step": int(step), "metric": metric,
            "value": float(value), "eps": float(eps), "codec": codec, "estimator": estimator}


def rows_to_frame(rows: Iterable[dict]) -> pd.DataFrame:
    df = pd.DataFrame(list(rows), columns=COLUMNS).fillna({"codec": "", "estimator": ""})
    return df.astype({"run_id": str, "epoch": "int64", "step": "int64", "metric": str,
                      "value": "float64", "eps": "float64", "codec": str, "estimator": str})


def write_table(path: Path, df: pd.DataFrame) -> None:
    atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def environment() -> dict:
    """Versions a run ran with: python, torch, numpy, codecs, git commit."""
    import bz2  # noqa: F401  (standard library; version is python's)
    import lzma

    import zstandard

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "numpy": np.__version__, "pandas": pd.__version__,
            "zstandard": zstandard.__version__, "zstd": zstandard.ZSTD_VERSION and ".".join(map(str, zstandard.ZSTD_VERSION)),
            "lzma": lzma.__name__, "git_commit": commit, "threads": torch.get_num_threads()}


def checkpoint_epoch(path: Path) -> int:
    """The epoch in a checkpoint's file name (RunDir.checkpoint_path)."""
    return int(path.stem.split("_")[1])


class RunDir:
    """Paths and state of one run folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.env = self.path / "env.json"
        self.status = self.path / "status.json"
        self.metrics = self.path / METRICS_FILE
        self.ckpt_dir = self.path / "checkpoints"

    @property
    def run_id(self) -> str:
        return self.path.resolve().name

    def exists(self) -> bool:
        return self.config.exists() or self.metrics.exists() or self.ckpt_dir.exists()

    def read_status(self) -> dict:
        return json.loads(self.status.read_text()) if self.status.exists() else {}

    def set_status(self, state: str, **extra: Any) -> None:
        write_json(self.status, {"state": state, **extra})

    def checkpoint_path(self, epoch: int) -> Path:
        return self.ckpt_dir / f"epoch_{epoch:06d}.pt"

    def checkpoints(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        return sorted(self.ckpt_dir.glob("epoch_*.pt")) if self.ckpt_dir.exists() else []

    def last_checkpoint_epoch(self) -> int:
        """The epoch of the newest checkpoint, 0 when there is none (where a resume starts)."""
        checkpoints = self.checkpoints()
        return checkpoint_epoch(checkpoints[-1]) if checkpoints else 0

    def read_metrics(self) -> pd.DataFrame:
        if not self.metrics.exists():
            return rows_to_frame([])
        df = pd.read_parquet(self.metrics)
        return df.assign(**{c: "" for c in ("codec", "estimator") if c not in df})


def save_checkpoint(path: Path, obj: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with ``weights_only=True``: opening it never executes code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict")
    return obj
