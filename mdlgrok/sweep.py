"""Sweeps: an experiment file's grid of runs, run in parallel local processes, gathered
into one tidy table.

    mdlgrok sweep experiments/rise_and_fall.toml --jobs 2              # the cpu length
    mdlgrok sweep experiments/rise_and_fall.toml --length paper --dry-run

An experiment file (TOML):

    name = "rise_and_fall"           # runs go to <root>/<name>/<key>/
    measure = true                   # measure complexity at every checkpoint (train --measure)
    [base]                           # TrainConfig fields shared by every run
    p = 113
    eps = [0.5]
    [grid]                           # lists; the runs are their cartesian product
    task = ["add", "mul"]
    seed = [0, 1, 2]
    [lengths]                        # epochs, chosen with --length (default cpu)
    cpu = 600
    paper = 10000

`[[grid]]` (an array of tables) gives the union of several products; identical resolved
configs run once. Each run folder is keyed by a hash of its resolved config
(`run_key`), so a sweep started again skips complete runs (status.json, written
atomically by train()), resumes partial ones from their last checkpoint and runs the rest.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd

from mdlgrok.results import COLUMNS, METRICS_FILE, RunDir, write_table
from mdlgrok.train import TrainConfig, TrainingFailed

try:
    import tomllib
except ImportError:  # pragma: no cover - python 3.10
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

TABLE_FILE = "table.parquet"
TOP_LEVEL = {"name", "description", "measure", "base", "grid", "lengths"}
# Config columns every gathered table carries beside run_id, so that it describes itself.
CONFIG_COLUMNS = ["task", "p", "frac", "model", "layers", "attention", "preset", "wd", "gamma", "sigma", "seed",
                  "epochs"]
# Further scalar fields, added as columns when they vary across the gathered runs.
EXTRA_COLUMNS = ["pos_rows", "noise", "lr", "batch", "adam_eps"]
FIELDS = {f.name: f for f in fields(TrainConfig)}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ---------------------------------------------------------------- experiment files
@dataclass
class Experiment:
    """A parsed experiment file: shared fields, one or more grids, lengths."""

    name: str
    base: dict[str, Any] = field(default_factory=dict)
    grids: list[dict[str, list]] = field(default_factory=lambda: [{}])  # the union of their products
    lengths: dict[str, int] = field(default_factory=dict)  # length name -> epochs
    description: str = ""
    source: str = "<experiment>"

    @classmethod
    def from_dict(cls, d: dict, source: str = "<experiment>") -> "Experiment":
        where = source
        if not isinstance(d, dict):
            raise ValueError(f"{where}: an experiment is a table")
        unknown = sorted(set(d) - TOP_LEVEL)
        if unknown:
            raise ValueError(f"{where}: unknown top-level key(s) {', '.join(map(repr, unknown))}; "
                             f"expected {', '.join(sorted(TOP_LEVEL))}")
        if "name" not in d and source == "<experiment>":
            raise ValueError(f"{where}: an experiment needs a name")
        name = d.get("name", Path(source).stem)  # a file's name defaults to its stem
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ValueError(f"{where}: name must be a folder name (letters, digits, '.', '_', '-'), got {name!r}")
        base = d.get("base", {})
        if not isinstance(base, dict):
            raise ValueError(f"{where}: [base] must be a table of TrainConfig fields")
        base = {k: coerce(k, v, f"{where} [base]") for k, v in base.items()}
        if "measure" in d:
            if "measure" in base:
                raise ValueError(f"{where}: set measure either at the top level or in [base], not both")
            base["measure"] = coerce("measure", d["measure"], where)
        raw_grids = d.get("grid", {})
        if isinstance(raw_grids, dict):
            raw_grids = [raw_grids]
        if not isinstance(raw_grids, list) or not raw_grids or not all(isinstance(g, dict) for g in raw_grids):
            raise ValueError(f"{where}: [grid] must be a table (or [[grid]] tables) of lists")
        grids = [parse_grid(g, f"{where} [grid]" if len(raw_grids) == 1 else f"{where} [[grid]] #{i + 1}")
                 for i, g in enumerate(raw_grids)]
        lengths = d.get("lengths", {})
        if not isinstance(lengths, dict):
            raise ValueError(f"{where}: [lengths] must be a table of name = epochs")
        for k, v in lengths.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{where} [lengths]: {k} must be a positive number of epochs, got {v!r}")
        if lengths and ("epochs" in base or any("epochs" in g for g in grids)):
            raise ValueError(f"{where}: set epochs either in [lengths] or in [base]/[grid], not both")
        description = d.get("description", "")
        if not isinstance(description, str):
            raise ValueError(f"{where}: description must be a string")
        return cls(name=name, base=base, grids=grids, lengths=dict(lengths), description=description,
                   source=source)

    def grid_fields(self) -> list[str]:
        """Fields that some grid varies, in order of first appearance."""
        return list(dict.fromkeys(k for g in self.grids for k in g))

    def resolve_length(self, length: str | None) -> int | None:
        """Epochs for a length name (None: `cpu` when the file has lengths, else the fields' epochs)."""
        if not self.lengths:
            if length is not None:
                raise ValueError(f"{self.source}: --length {length}: the experiment has no [lengths] table")
            return None
        length = "cpu" if length is None else length
        if length not in self.lengths:
            raise ValueError(f"{self.source}: unknown length {length!r}; choose from {', '.join(self.lengths)}")
        return self.lengths[length]


def parse_grid(grid: dict, where: str) -> dict[str, list]:
    out = {}
    for k, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}: {k} must be a non-empty list of values, got {values!r}")
        out[k] = [coerce(k, v, where) for v in values]
    return out


def coerce(name: str, value: Any, where: str) -> Any:
    """A TOML value checked against the TrainConfig field's type (ints become floats for float fields)."""
    if name not in FIELDS:
        raise ValueError(f"{where}: unknown TrainConfig field {name!r}; known: {', '.join(FIELDS)}")
    kind = FIELDS[name].type
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    if value is None:
        return None
    if kind.startswith("tuple"):
        if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
            raise ValueError(f"{where}: {name} must be a list of numbers, got {value!r}")
        return tuple(float(v) for v in value)
    if kind.startswith("float"):
        if not _is_number(value):
            raise ValueError(f"{where}: {name} must be a number, got {value!r}")
        return float(value)
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: {name} must be an integer, got {value!r}")
        return value
    if kind.startswith("bool"):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {name} must be true or false, got {value!r}")
        return value
    if kind.startswith("str"):
        if not isinstance(value, str):
            raise ValueError(f"{where}: {name} must be a string, got {value!r}")
        return value
    return value  # pragma: no cover - a field type this parser does not know


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_experiment(experiment: str | Path | dict | Experiment) -> Experiment:
    """An Experiment from a TOML file, a dict of the same shape, or an Experiment."""
    if isinstance(experiment, Experiment):
        return experiment
    if isinstance(experiment, dict):
        return Experiment.from_dict(experiment)
    path = Path(experiment)
    if not path.is_file():
        raise FileNotFoundError(f"experiment file {path} does not exist")
    if tomllib is None:  # pragma: no cover - python 3.10 without tomli
        raise ValueError("reading experiment files needs python >= 3.11 or the tomli package")
    try:
        d = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file") from None
    return Experiment.from_dict(d, source=str(path))


# ---------------------------------------------------------------- expansion and keys
def expand(experiment: str | Path | dict | Experiment, length: str | None = None) -> list[TrainConfig]:
    """Every run of the experiment, validated; identical resolved configs appear once."""
    exp = load_experiment(experiment)
    epochs = exp.resolve_length(length)
    configs: dict[str, TrainConfig] = {}
    for g, grid in enumerate(exp.grids):
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            point = dict(zip(keys, values))
            kw = {**exp.base, **point}
            if epochs is not None:
                kw["epochs"] = epochs
            try:
                cfg = TrainConfig(**kw)
            except (TypeError, ValueError) as exc:
                at = ", ".join(f"{k}={v!r}" for k, v in point.items()) or "the [base] config"
                raise ValueError(f"{exp.source}: invalid run ({at}): {exc}") from None
            configs.setdefault(run_key(cfg), cfg)
    return list(configs.values())


def canonical(cfg: TrainConfig) -> dict:
    """cfg.to_dict() with float fields as floats, so `wd = 1` and `wd = 1.0` hash alike."""
    return {k: coerce(k, v, "config") for k, v in cfg.to_dict().items()}


def config_hash(cfg: TrainConfig, n: int = 12) -> str:
    text = json.dumps(canonical(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def run_key(cfg: TrainConfig) -> str:
    """A stable, readable folder name: task-preset[-overrides]-s<seed>-<sha256 of the config, 12 hex>.

    The readable part names the task, preset, non-default attention or model, and the
    regularizer weights that override the preset; the hash alone makes keys distinct.
    """
    from mdlgrok.regularizers import preset as reg_preset

    parts = [cfg.task, cfg.preset]
    if cfg.attention != FIELDS["attention"].default:
        parts.append(cfg.attention)
    if cfg.model != FIELDS["model"].default:
        parts.append(cfg.model)
    base = reg_preset(cfg.preset, cfg.task)
    for name, short in (("wd", "wd"), ("gamma", "g"), ("sigma", "n")):
        if getattr(cfg, name) != getattr(base, name):
            parts.append(f"{short}{getattr(cfg, name):g}")
    parts.append(f"s{cfg.seed}")
    return "-".join(parts + [config_hash(cfg)])


# ---------------------------------------------------------------- planning
@dataclass
class PlannedRun:
    key: str
    cfg: TrainConfig
    path: Path
    state: str  # new | partial | complete | failed
    epoch: int = 0  # the epoch the run has reached (its status)


def run_state(path: Path, cfg: TrainConfig) -> tuple[str, int]:
    """(new | partial | complete | failed, epoch reached) of a run folder; refuses a folder of another config."""
    run = RunDir(path)
    if not run.path.exists() or not run.exists():
        return "new", 0
    if run.config.exists():
        try:
            saved = TrainConfig.from_dict(json.loads(run.config.read_text()))
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"{run.config} is unreadable ({exc}); remove the run folder to start it again") from None
        if canonical(saved) != canonical(cfg):
            raise ValueError(f"{run.path} holds a run of a different config than its key says; remove it")
    try:
        status = run.read_status()
    except ValueError:
        status = {}
    state = status.get("state")
    epoch = int(status.get("epoch", 0) or 0)
    if state == "complete" and epoch >= cfg.epochs:
        return "complete", epoch
    if state == "failed":
        return "failed", epoch
    return "partial", epoch


def plan(experiment, root: str | Path = "runs", length: str | None = None) -> list[PlannedRun]:
    """The experiment's runs with their folders and states."""
    exp = load_experiment(experiment)
    folder = Path(root) / exp.name
    out = []
    for cfg in expand(exp, length):
        key = run_key(cfg)
        state, epoch = run_state(folder / key, cfg)
        out.append(PlannedRun(key, cfg, folder / key, state, epoch))
    return out


# ---------------------------------------------------------------- running
def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not linux
        return os.cpu_count() or 1


def threads_per_worker(workers: int) -> int:
    """torch threads for each of `workers` processes, so that together they fill the cores once."""
    return max(1, available_cores() // workers)


def run_one(cfg_dict: dict, path: str, threads: int | None = None) -> dict:
    """Train (or resume) one run; in a worker process. Never raises: returns an outcome."""
    import torch

    from mdlgrok.train import train

    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    checkpoints = RunDir(path).checkpoints()
    outcome = {"key": Path(path).name, "path": path, "threads": torch.get_num_threads(),
               "resumed_from": int(checkpoints[-1].stem.split("_")[1]) if checkpoints else 0}
    try:
        cfg = TrainConfig.from_dict(cfg_dict)
        measure_fn = None
        if cfg.measure:
            from mdlgrok.measure import measure_trainer

            measure_fn = lambda trainer: measure_trainer(trainer, cfg.eps)  # noqa: E731
        # resume=True continues a partial run from its last checkpoint and starts a new one afresh
        trainer = train(cfg, path, resume=True, progress=False, measure_fn=measure_fn)
        outcome.update(state="complete", epoch=trainer.epoch)
    except TrainingFailed as exc:
        outcome.update(state="failed", reason=str(exc))
    except Exception as exc:  # a bug, not a diverged run: reported with its traceback, the others go on
        outcome.update(state="error", reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    outcome["seconds"] = time.perf_counter() - start
    return outcome


def run_sweep(experiment, root: str | Path = "runs", jobs: int = 1, length: str | None = None,
              executor: str = "local", progress: bool = True, threads: int | None = None) -> pd.DataFrame:
    """Run what is missing of an experiment's grid and return the gathered table.

    Complete runs are skipped, partial ones resume, the rest start; `jobs` local processes
    (spawned) with `threads` torch threads each (default cores // jobs, so the cores are not
    oversubscribed); jobs=1 runs in this process with its thread setting. A diverged run
    (TrainingFailed) is reported and the others go on. The outcomes are in
    `table.attrs["outcomes"]`; the table is also written to <root>/<name>/table.parquet.
    """
    if executor != "local":
        raise ValueError(f"unknown executor {executor!r}; this version runs sweeps with 'local' processes")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    exp = load_experiment(experiment)
    runs = plan(exp, root, length)
    todo = [r for r in runs if r.state in ("new", "partial")]
    done = [r for r in runs if r.state not in ("new", "partial")]
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)
    say(f"sweep {exp.name}: {len(runs)} runs, {sum(r.state == 'complete' for r in runs)} complete, "
        f"{sum(r.state == 'failed' for r in runs)} failed earlier, {len(todo)} to run"
        + (f" on {min(jobs, len(todo))} processes" if todo else ""))
    outcomes = [{"key": r.key, "path": str(r.path), "state": "skipped", "was": r.state, "epoch": r.epoch}
                for r in done]
    for r in done:
        if r.state == "failed":
            say(f"  {r.key}: failed earlier (status.json); skipped")
    for i, outcome in enumerate(_execute(todo, jobs, threads), 1):
        outcomes.append(outcome)
        say(f"[{i}/{len(todo)}] {_describe(outcome)}")
        if outcome["state"] == "error":
            say(outcome["traceback"].rstrip())
    table = gather(Path(root) / exp.name, keys=[r.key for r in runs])
    table.attrs["outcomes"] = outcomes
    return table


def _execute(todo: list[PlannedRun], jobs: int, threads: int | None):
    """Outcomes of the runs, in the order they finish."""
    if not todo:
        return
    workers = min(jobs, len(todo))
    if workers == 1:
        for r in todo:
            yield run_one(r.cfg.to_dict(), str(r.path), threads)
        return
    import multiprocessing

    threads = threads or threads_per_worker(workers)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(run_one, r.cfg.to_dict(), str(r.path), threads): r for r in todo}
        for fut in as_completed(futures):
            yield fut.result()
    finally:  # on an interrupt, queued runs never start; running ones stop with the pool
        pool.shutdown(wait=True, cancel_futures=True)


def _describe(o: dict) -> str:
    if o["state"] == "complete":
        resumed = f" (resumed from epoch {o['resumed_from']})" if o.get("resumed_from") else ""
        return f"{o['key']}: complete at epoch {o['epoch']}{resumed} in {o['seconds']:.1f} s"
    if o["state"] == "failed":
        return f"{o['key']}: FAILED: {o['reason']}"
    return f"{o['key']}: ERROR: {o['reason']}"


# ---------------------------------------------------------------- gathering
def gather(folder: str | Path, keys: list[str] | None = None) -> pd.DataFrame:
    """All runs of an experiment folder (or those named by keys) as one tidy table.

    The metrics of every run are read with one `pandas.read_parquet` call; the run's config
    columns (CONFIG_COLUMNS, plus EXTRA_COLUMNS that vary) are joined beside run_id. The
    table is written to <folder>/table.parquet.
    """
    folder = Path(folder)
    if keys is None:
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not an experiment folder")
        candidates = sorted(d for d in folder.iterdir() if d.is_dir())
    else:
        candidates = [folder / k for k in sorted(set(keys))]
    runs = [RunDir(d) for d in candidates if (d / METRICS_FILE).is_file() and (d / "config.json").is_file()]
    if not runs and keys is None:
        raise FileNotFoundError(f"{folder} holds no run with a {METRICS_FILE}")
    if not runs:  # every run failed before its first checkpoint
        return pd.DataFrame({c: pd.Series(dtype=object) for c in ["run_id", *CONFIG_COLUMNS, *COLUMNS[1:]]})
    metrics = pd.read_parquet([str(r.metrics) for r in runs])
    for col in ("codec", "estimator"):  # columns older runs lack
        if col not in metrics:
            metrics[col] = ""
    configs = pd.DataFrame([{"run_id": r.path.name, **json.loads(r.config.read_text())} for r in runs])
    extras = [c for c in EXTRA_COLUMNS if c in configs and configs[c].astype(str).nunique() > 1]
    configs = configs[["run_id", *CONFIG_COLUMNS, *extras]]
    configs = configs.astype({"run_id": str, "task": str, "p": "int64", "frac": "float64", "model": str,
                              "layers": "int64", "attention": str, "preset": str, "wd": "float64",
                              "gamma": "float64", "sigma": "float64", "seed": "int64", "epochs": "int64"})
    table = metrics.merge(configs, on="run_id", how="left", validate="many_to_one")
    rest = [c for c in metrics.columns if c != "run_id"]
    table = table[["run_id", *CONFIG_COLUMNS, *extras, *rest]]
    write_table(folder / TABLE_FILE, table)
    return table


# ---------------------------------------------------------------- the command
def command(a) -> int:
    """`mdlgrok sweep`: 0 when every run is complete, 1 when some failed, 2 on bad input."""
    if a.dry_run:
        exp = load_experiment(a.experiment)
        runs = plan(exp, a.root, a.length)
        shown = [k for k in exp.grid_fields() if k != "epochs"]
        width = max(len(r.key) for r in runs)
        for r in runs:
            state = r.state + (f" (epoch {r.epoch})" if r.state in ("partial", "failed") else "")
            values = " ".join(f"{k}={getattr(r.cfg, k)}" for k in shown)
            print(f"{r.key:<{width}}  {state:<17} epochs={r.cfg.epochs} {values}".rstrip())
        counts = {s: sum(r.state == s for r in runs) for s in ("complete", "partial", "new", "failed")}
        print(f"{len(runs)} runs in {Path(a.root) / exp.name}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        return 0
    table = run_sweep(a.experiment, root=a.root, jobs=a.jobs, length=a.length, progress=not a.quiet)
    outcomes = table.attrs["outcomes"]
    bad = [o for o in outcomes if o["state"] in ("failed", "error") or o.get("was") == "failed"]
    exp = load_experiment(a.experiment)
    print(f"{Path(a.root) / exp.name / TABLE_FILE}: {table.run_id.nunique()} runs, {len(table)} rows"
          + (f"; {len(bad)} failed" if bad else ""))
    return 1 if bad else 0
