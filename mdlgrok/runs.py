"""Run folders and tidy tables.

A run folder holds ``config.json`` (the resolved TrainConfig), ``env.json`` (versions),
``status.json`` (running, complete or failed, with the reason), ``checkpoints/``,
``metrics.parquet`` (written by training only: one row per run_id, epoch, step, metric,
value) and, once measured, ``measures.parquet`` (the measure stage's rows, each naming the
estimator, its version and options that measured it) with ``payloads/``.
Every write is atomic (temporary file, then rename), so a run killed at any moment leaves
each earlier row and checkpoint readable.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

METRIC_COLUMNS = ["run_id", "epoch", "step", "metric", "value"]
# A measure row adds the tolerance (NaN where none), the winning codec, and what measured it.
MEASURE_COLUMNS = [*METRIC_COLUMNS, "eps", "codec", "estimator", "estimator_version", "options"]
TEXT_COLUMNS = ["codec", "estimator", "estimator_version", "options"]
# What makes a measure row unique within a run: a new row of the same key replaces the old one.
MEASURE_KEY = ["epoch", "metric", "eps", "codec", "estimator", "estimator_version", "options"]
METRICS_FILE = "metrics.parquet"
MEASURES_FILE = "measures.parquet"


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


def row(run_id: str, epoch: int, step: int, metric: str, value: float) -> dict:
    """One tidy training-metric row."""
    return {"run_id": run_id, "epoch": int(epoch), "step": int(step), "metric": metric, "value": float(value)}


def rows_to_frame(rows: Iterable[dict], columns: list[str] = METRIC_COLUMNS) -> pd.DataFrame:
    """Rows as a typed frame with `columns` (METRIC_COLUMNS or MEASURE_COLUMNS)."""
    df = pd.DataFrame(list(rows), columns=columns)
    text = [c for c in TEXT_COLUMNS if c in columns]
    for c in text:  # missing text is "", never NaN
        df[c] = df[c].astype(object).where(df[c].notna(), "")
    types = {"run_id": str, "epoch": "int64", "step": "int64", "metric": str, "value": "float64"}
    types.update({"eps": "float64"} if "eps" in columns else {})
    return df.astype({**types, **{c: str for c in text}})


def write_table(path: Path, df: pd.DataFrame) -> None:
    atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def environment() -> dict:
    """Versions a run ran with: python, torch, numpy, codecs, git commit."""
    import bz2  # noqa: F401  (standard library; version is python's)
    import lzma

    import zstandard

    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "zstandard": zstandard.__version__,
        "zstd": zstandard.ZSTD_VERSION and ".".join(map(str, zstandard.ZSTD_VERSION)),
        "lzma": lzma.__name__,
        "git_commit": commit,
        "threads": torch.get_num_threads(),
    }


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
        self.measures = self.path / MEASURES_FILE
        self.payloads = self.path / "payloads"
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
        """The training metrics (METRIC_COLUMNS)."""
        if not self.metrics.exists():
            return rows_to_frame([])
        return pd.read_parquet(self.metrics)

    def read_measures(self) -> pd.DataFrame:
        """The measure stage's rows (MEASURE_COLUMNS), empty when the run was never measured."""
        if not self.measures.exists():
            return rows_to_frame([], MEASURE_COLUMNS)
        return pd.read_parquet(self.measures)

    def add_measures(self, rows: list[dict]) -> pd.DataFrame:
        """Add rows to measures.parquet; a row replaces an older one of the same MEASURE_KEY.
        Returns the new rows as a frame."""
        new = rows_to_frame(rows, MEASURE_COLUMNS)
        both = pd.concat([self.read_measures(), new], ignore_index=True)
        key = both[MEASURE_KEY].assign(eps=both.eps.fillna(-1.0))  # NaN eps (measures without one) match
        write_table(self.measures, both[~key.duplicated(keep="last")].reset_index(drop=True))
        return new

    def read_all(self) -> pd.DataFrame:
        """Training metrics and measures as one tidy frame (MEASURE_COLUMNS)."""
        return pd.concat(
            [rows_to_frame(self.read_metrics().to_dict("records"), MEASURE_COLUMNS), self.read_measures()],
            ignore_index=True,
        )


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


# ---------------------------------------------------------------- a run's model
def config_of(d: dict):
    """A TrainConfig from a checkpoint's or an older folder's dict: the measure settings that older
    versions kept in the training config (`measure`, `eps`) never changed the weights and are dropped."""
    from mdlgrok.config import LEGACY_FIELDS, TrainConfig

    return TrainConfig.from_dict({k: v for k, v in d.items() if k not in LEGACY_FIELDS})


def model_from_checkpoint(path: str | Path):
    """(model, data, epoch, step) from an mdlgrok checkpoint, loaded without executing code; data
    is what the run trained on (its subset, if any), with the run's loss."""
    import torch

    from mdlgrok.models import build_model
    from mdlgrok.training.start import training_data

    ckpt = load_checkpoint(path)
    if "config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(
            f"checkpoint {path} is not an mdlgrok training checkpoint (no config); "
            "use mdlgrok.complexity.estimate on your own module"
        )
    cfg = config_of(json.loads(ckpt["config"]))
    model = build_model(cfg.model_config()).to(getattr(torch, cfg.dtype))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not match its config: {str(exc).splitlines()[0]}") from None
    return model, training_data(cfg), int(ckpt.get("epoch", 0)), int(ckpt.get("step", 0))


# ---------------------------------------------------------------- older run folders
def is_legacy(run: RunDir) -> bool:
    """Whether a run folder has the older layout: measure settings in config.json, or measure
    rows (eps, codec, estimator columns) inside metrics.parquet."""
    from mdlgrok.config import LEGACY_FIELDS

    if run.config.exists() and LEGACY_FIELDS & set(json.loads(run.config.read_text())):
        return True
    return run.metrics.exists() and "eps" in pd.read_parquet(run.metrics, columns=None).columns


def convert_run(path: str | Path, estimator_version: str = "unknown", options: str = "{}") -> bool:
    """Convert an older run folder in place; False when it has the current layout already.

    The measure rows of metrics.parquet (those with an eps or an estimator) move to
    measures.parquet, labelled with `estimator_version` and `options` (JSON), which older
    folders did not record; config.json loses `measure` and `eps`. Written measures first,
    then metrics, then config, so that converting again after an interruption finishes the job.
    """
    from mdlgrok.config import LEGACY_FIELDS

    run = RunDir(path)
    if not run.config.exists():
        raise FileNotFoundError(f"{path} is not a run folder (no config.json)")
    if not is_legacy(run):
        return False
    metrics = pd.read_parquet(run.metrics) if run.metrics.exists() else rows_to_frame([])
    if "eps" in metrics.columns:
        if "estimator" not in metrics:  # the oldest layout: every measure row was mdlgrok's search
            metrics = metrics.assign(estimator=metrics.eps.notna().map({True: "mdlgrok", False: ""}))
        metrics = metrics.assign(**{"codec": ""} if "codec" not in metrics else {})
        measured = metrics.eps.notna() | (metrics.estimator != "")
        moved = metrics[measured].assign(estimator_version=estimator_version, options=options)
        if len(moved):  # rows already moved by an interrupted conversion replace themselves
            run.add_measures(moved.to_dict("records"))
        write_table(run.metrics, rows_to_frame(metrics[~measured].to_dict("records")))
    cfg = json.loads(run.config.read_text())
    write_json(run.config, {k: v for k, v in cfg.items() if k not in LEGACY_FIELDS})
    return True


def rename_run(path: str | Path, new_path: str | Path) -> RunDir:
    """Move a run folder and rewrite the run_id of its tables to the new folder name."""
    Path(path).rename(new_path)
    run = RunDir(new_path)
    for table, columns in ((run.metrics, METRIC_COLUMNS), (run.measures, MEASURE_COLUMNS)):
        if table.exists():
            df = pd.read_parquet(table)
            write_table(table, rows_to_frame(df.assign(run_id=run.run_id).to_dict("records"), columns))
    return run
