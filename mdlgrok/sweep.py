"""Sweeps: an experiment file's grid of runs, run in parallel local processes, gathered
into one tidy table.

    mdlgrok sweep experiments/rise_and_fall.toml --jobs 2              # the cpu length
    mdlgrok sweep experiments/rise_and_fall.toml --length paper --dry-run
    mdlgrok sweep experiments/rise_and_fall.toml --executor slurm --slurm-partition cpu   # pip install submitit
    mdlgrok sweep experiments/rise_and_fall.toml --measure-only --jobs 2              # complexity as its own stage
    mdlgrok sweep experiments/regularizers.toml --device cuda --stack-size 64          # stacks of runs on a GPU

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

Executors: `local` (processes on this machine, threads per process = cores // jobs),
`slurm` (a Slurm job array through submitit; each task resumes from its run's last
checkpoint, so a job requeued after a timeout or preemption continues where it stopped) and
`submitit-local` (submitit's LocalExecutor: the same code path as slurm, as subprocesses
here, at most `jobs` at a time). Runs are shared across experiments under one root: a new
run whose key (so its whole resolved config) is complete in a sibling experiment's folder
becomes a relative link to it instead of training again (`share=False`, `--no-share`: train
it anyway). On a GPU (`--device auto` finds it) runs train as stacks (`mdlgrok.stacked`:
N models of one architecture per process, `--stack on|off|auto`, `--stack-size`), each
stack one executor task; measuring them is then a stage of its own. `--measure-only` measures the checkpoints of every complete
run whose metrics lack complexity rows (all of them with `--remeasure`) on the same
executors, then gathers the table again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd

from mdlgrok.results import COLUMNS, METRICS_FILE, RunDir, checkpoint_epoch, write_table
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
EXECUTORS = ("local", "slurm", "submitit-local")
STACK_MODES = ("auto", "on", "off")
SUBMITIT_FOLDER = ".submitit"  # <root>/<name>/.submitit: submitit's pickles and job logs


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


def find_shared(root: Path, run: PlannedRun) -> Path | None:
    """A complete run of the same key (hence the same resolved config) in another experiment under root."""
    for other in sorted(Path(root).glob(f"*/{run.key}")):
        if other.parent != run.path.parent and not other.is_symlink() and run_state(other, run.cfg)[0] == "complete":
            return other
    return None


def share_runs(runs: list[PlannedRun], root: str | Path, say) -> None:
    """Link each new run to a complete run of the same config in a sibling experiment (in place: state complete)."""
    for r in runs:
        other = find_shared(Path(root), r) if r.state == "new" else None
        if other is None:
            continue
        r.path.parent.mkdir(parents=True, exist_ok=True)
        if r.path.is_symlink():  # a dangling link left behind: replace it
            r.path.unlink()
        r.path.symlink_to(os.path.relpath(other, r.path.parent), target_is_directory=True)
        r.state, r.epoch = run_state(r.path, r.cfg)
        say(f"  {r.key}: complete in {other.parent.name}; linked, not trained again")


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
    outcome = {"key": Path(path).name, "path": path, "threads": torch.get_num_threads(),
               "resumed_from": RunDir(path).last_checkpoint_epoch()}
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


def run_stack(cfg_dicts: list[dict], paths: list[str], device: str = "cpu", threads: int | None = None) -> list[dict]:
    """Train (or resume) runs together as one stack (mdlgrok.stacked.train_runs); in a worker
    process. Never raises: returns one outcome per run."""
    import torch

    from mdlgrok.stacked import train_runs

    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    base = {"threads": torch.get_num_threads(), "stacked": len(paths), "device": device}
    resumed = [RunDir(p).last_checkpoint_epoch() for p in paths]
    try:
        results = train_runs([TrainConfig.from_dict(d) for d in cfg_dicts], paths, device)
        outcomes = [{"key": Path(r["path"]).name, **base, **r} for r in results]
    except Exception as exc:  # a bug or a bad stack: every run of it is reported, the other stacks go on
        error = {"state": "error", "reason": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        outcomes = [{"key": Path(p).name, "path": p, **base, **error} for p in paths]
    for o, epoch in zip(outcomes, resumed):
        o.update(seconds=time.perf_counter() - start, resumed_from=epoch)
    return outcomes


def measure_one(path: str, eps, mode: str = "mdlgrok", threads: int | None = None) -> dict:
    """Measure every checkpoint of one run (measure_run, in this process); never raises: returns an outcome."""
    import torch
    from threadpoolctl import threadpool_limits

    from mdlgrok.measure import measure_run

    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    outcome = {"key": Path(path).name, "path": path, "threads": torch.get_num_threads()}
    try:
        with threadpool_limits(threads or torch.get_num_threads()):  # numpy's BLAS (the SVDs) too
            new = measure_run(path, list(eps), jobs=1, mode=mode, progress=False)
        outcome.update(state="measured", checkpoints=int(new.epoch.nunique()))
    except Exception as exc:
        outcome.update(state="error", reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    outcome["seconds"] = time.perf_counter() - start
    return outcome


@dataclass
class SlurmOptions:
    """Resources of each submitit job (one run per job): Slurm partition (None: the cluster's
    default), wall time in minutes (a job that reaches it is requeued and resumes from its
    checkpoint, up to 3 times) and cpus, which are also the run's torch threads."""

    partition: str | None = None
    time: int = 240
    cpus: int = 4

    def __post_init__(self):
        for name in ("time", "cpus"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                flag = "--slurm-time (minutes)" if name == "time" else "--slurm-cpus"
                raise ValueError(f"{flag} must be a positive integer, got {v!r}")


class ExecutorUnavailable(ValueError):
    """An executor that cannot run here (submitit not installed, no Slurm)."""


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise ExecutorUnavailable("the slurm and submitit-local executors need submitit: "
                                  "pip install 'mdlgrok[slurm]' (or pip install submitit)") from None
    return submitit


def check_executor(executor: str, jobs: int | None) -> None:
    """Bad executor settings fail before any work (ValueError, the command's status 2)."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose from {', '.join(EXECUTORS)}")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    if executor != "local":
        import_submitit()
    if executor == "slurm" and (shutil.which("sbatch") is None or shutil.which("srun") is None):
        raise ExecutorUnavailable("--executor slurm: no Slurm here (sbatch or srun not found); "
                                  "use --executor local or submitit-local")


class Resumable:
    """fn(*args) as a submitit job that Slurm may requeue: on a timeout or preemption submitit
    calls checkpoint(), which submits the same call again; the run resumes from its last
    checkpoint (training) or measures again (measuring), so nothing is lost but the current epoch."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def resolve_device(device: str) -> str:
    """auto: cuda where torch sees a GPU, else cpu."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}, but torch sees no GPU (torch.cuda.is_available() is False)")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return device


def use_stacks(stack: str, device: str) -> bool:
    """Whether to train runs as stacks: `auto` stacks on a GPU, where it pays (bench-stacked), not on CPU."""
    if stack not in STACK_MODES:
        raise ValueError(f"unknown stack mode {stack!r}; choose {', '.join(STACK_MODES)}")
    if stack == "off" and device != "cpu":
        raise ValueError(f"--stack off trains one run per process on CPU; --device {device} needs stacks")
    return stack == "on" or (stack == "auto" and device != "cpu")


def stack_groups(runs: list[PlannedRun], size: int) -> list[list[PlannedRun]]:
    """Runs that train as one stack: the same shared fields (mdlgrok.stacked.SHARED_FIELDS) and the
    same resume epoch (their last checkpoint), at most `size` runs per stack, in plan order."""
    from mdlgrok.stacked import SHARED_FIELDS

    if size < 1:
        raise ValueError(f"--stack-size must be at least 1, got {size}")
    groups: dict[tuple, list[PlannedRun]] = {}
    for r in runs:
        key = (*(getattr(r.cfg, f) for f in SHARED_FIELDS), RunDir(r.path).last_checkpoint_epoch())
        groups.setdefault(key, []).append(r)
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


def run_sweep(experiment, root: str | Path = "runs", jobs: int | None = None, length: str | None = None,
              executor: str = "local", progress: bool = True, threads: int | None = None,
              slurm: SlurmOptions | None = None, share: bool = True, stack: str = "auto",
              device: str = "auto", stack_size: int = 64) -> pd.DataFrame:
    """Run what is missing of an experiment's grid and return the gathered table.

    Complete runs are skipped, partial ones resume, the rest start; with `share`, a new run
    complete under another experiment of the same root is linked (`share_runs`). Stacks
    (`stack`: auto, on, off): with "on", or "auto" on a GPU (`device` auto picks cuda when
    torch sees one), runs that share architecture, data shapes and resume epoch train together
    (`stack_groups`, at most `stack_size` per stack, one executor task each), then the measured
    ones are measured as a stage of their own; otherwise each run is one task on CPU. executor="local": `jobs`
    local processes (spawned, default 1) with `threads` torch threads each (default
    cores // jobs, so the cores are not oversubscribed); jobs=1 runs in this process with its
    thread setting. executor="slurm": one Slurm job array through submitit, at most `jobs`
    tasks at once (default: no limit), each with `slurm` resources; "submitit-local": the
    same through submitit's LocalExecutor, at most `jobs` (default 1) subprocesses at a time.
    A diverged run (TrainingFailed) is reported and the others go on. The outcomes are in
    `table.attrs["outcomes"]`; the table is also written to <root>/<name>/table.parquet.
    """
    check_executor(executor, jobs)
    device = resolve_device(device)
    stacked = use_stacks(stack, device)
    if stack_size < 1:
        raise ValueError(f"--stack-size must be at least 1, got {stack_size}")
    exp = load_experiment(experiment)
    runs = plan(exp, root, length)
    say = _say(progress)
    if share:
        share_runs(runs, root, say)
    todo = [r for r in runs if r.state in ("new", "partial")]
    done = [r for r in runs if r.state not in ("new", "partial")]
    say(f"sweep {exp.name}: {len(runs)} runs, {sum(r.state == 'complete' for r in runs)} complete, "
        f"{sum(r.state == 'failed' for r in runs)} failed earlier, {len(todo)} to run"
        + (f" {_where(executor, jobs, len(todo))}" if todo else ""))
    outcomes = [{"key": r.key, "path": str(r.path), "state": "skipped", "was": r.state, "epoch": r.epoch}
                for r in done]
    for r in done:
        if r.state == "failed":
            say(f"  {r.key}: failed earlier (status.json); skipped")
    if not stacked:
        tasks = [(r.key, p, (r.cfg.to_dict(), p)) for r in todo for p in [_job_path(r.path, executor)]]
        return _run_and_gather(run_one, tasks, f"mdlgrok-{exp.name}", outcomes, say, runs, exp, root,
                               jobs, threads, executor, slurm)
    stacks = stack_groups(todo, stack_size)
    if stacks:
        say(f"  as {len(stacks)} stack{'s' * (len(stacks) > 1)} on {device}: {', '.join(str(len(g)) for g in stacks)} runs")
    tasks = [(g[0].key, str(g[0].path), ([r.cfg.to_dict() for r in g], [_job_path(r.path, executor) for r in g], device))
             for g in stacks]
    table = _run_and_gather(run_stack, tasks, f"mdlgrok-{exp.name}", outcomes, say, runs, exp, root,
                            jobs, threads, executor, slurm)
    new = [r for r in todo if r.cfg.measure and RunDir(r.path).read_status().get("state") == "complete"]
    if not new:
        return table
    measured = _run_and_gather(measure_one, _measure_tasks(new, "mdlgrok", executor), f"mdlgrok-measure-{exp.name}",
                               [], say, runs, exp, root, jobs, threads, executor, slurm)
    errors = [o for o in measured.attrs["outcomes"] if o["state"] == "error"]
    measured.attrs["outcomes"] = table.attrs["outcomes"] + errors  # one outcome per run, plus measuring errors
    return measured


def measured(run: PlannedRun, mode: str = "mdlgrok") -> bool:
    """Whether the run's metrics hold a complexity_bits row of this estimator for every checkpoint and eps."""
    rd = RunDir(run.path)
    epochs = {checkpoint_epoch(c) for c in rd.checkpoints()}
    m = rd.read_metrics()
    m = m[(m.metric == "complexity_bits") & (m.estimator == mode)]
    have = set(zip(m.epoch.astype(int), m.eps.astype(float)))
    return {(e, float(x)) for e in epochs for x in run.cfg.eps} <= have


def measure_sweep(experiment, root: str | Path = "runs", jobs: int | None = None, length: str | None = None,
                  executor: str = "local", progress: bool = True, threads: int | None = None,
                  slurm: SlurmOptions | None = None, remeasure: bool = False,
                  mode: str = "mdlgrok") -> pd.DataFrame:
    """Measure the checkpoints of the experiment's complete runs, as a stage of its own; return the gathered table.

    Each complete run whose metrics lack a complexity_bits row (estimator `mode`) for some
    checkpoint and eps of its config (every complete run with `remeasure`) is measured by
    `mdlgrok.measure.measure_run` in one task; the tasks run on the executors of run_sweep.
    Rows of the same estimator are replaced, so measuring again never duplicates rows. Runs
    not complete are left alone (run the sweep first). Outcomes in `table.attrs["outcomes"]`.
    """
    check_executor(executor, jobs)
    if mode not in ("mdlgrok", "paper"):
        raise ValueError(f"unknown estimator mode {mode!r}; choose mdlgrok or paper")
    exp = load_experiment(experiment)
    runs = plan(exp, root, length)
    complete = [r for r in runs if r.state == "complete"]
    todo = [r for r in complete if remeasure or not measured(r, mode)]
    say = _say(progress)
    say(f"measure {exp.name}: {len(runs)} runs, {len(complete)} complete, "
        f"{len(complete) - len(todo)} measured already, {len(todo)} to measure"
        + (f" {_where(executor, jobs, len(todo))}" if todo else ""))
    outcomes, chosen = [], {r.key for r in todo}
    for r in runs:
        if r.state != "complete":
            say(f"  {r.key}: {r.state}, not measured" + (" (run the sweep first)" if r.state != "failed" else ""))
            outcomes.append({"key": r.key, "path": str(r.path), "state": "skipped", "was": r.state})
        elif r.key not in chosen:
            outcomes.append({"key": r.key, "path": str(r.path), "state": "skipped", "was": "measured"})
    return _run_and_gather(measure_one, _measure_tasks(todo, mode, executor), f"mdlgrok-measure-{exp.name}", outcomes, say, runs, exp, root,
                           jobs, threads, executor, slurm)


def _measure_tasks(runs: list[PlannedRun], mode: str, executor: str) -> list[tuple[str, str, tuple]]:
    """measure_one tasks (key, path, args) for runs, every eps of each run's config."""
    return [(r.key, p, (p, tuple(r.cfg.eps), mode)) for r in runs for p in [_job_path(r.path, executor)]]


def _run_and_gather(fn, tasks, job_name, outcomes, say, runs, exp, root, jobs, threads, executor, slurm):
    """Run the tasks on the executor, report each outcome, then gather the experiment's table."""
    for i, result in enumerate(_execute(fn, tasks, jobs, threads, executor, slurm, Path(root) / exp.name,
                                        job_name), 1):
        for outcome in result if isinstance(result, list) else [result]:  # a stack: one outcome per run
            outcomes.append(outcome)
            say(f"[{i}/{len(tasks)}] {_describe(outcome)}")
            if outcome["state"] == "error":
                say(outcome["traceback"].rstrip())
    table = gather(Path(root) / exp.name, keys=[r.key for r in runs])
    table.attrs["outcomes"] = outcomes
    return table


def _say(progress: bool):
    return (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)


def _job_path(path: Path, executor: str) -> str:
    """The run folder as a job gets it: absolute for submitit, since a job may start in another directory."""
    return str(path if executor == "local" else path.resolve())


def _where(executor: str, jobs: int | None, n: int) -> str:
    if executor == "slurm":
        return "as a Slurm job array" + (f" (at most {jobs} at once)" if jobs else "")
    workers = min(jobs or 1, n)
    return f"on {workers} {'submitit-local ' if executor == 'submitit-local' else ''}process" + "es" * (workers > 1)


def _execute(fn, tasks: list[tuple[str, str, tuple]], jobs: int | None, threads: int | None,
             executor: str = "local", slurm: SlurmOptions | None = None, folder: Path | None = None,
             name: str = "mdlgrok"):
    """Outcomes of fn(*args, threads) for tasks of (key, path, args), in the order they finish."""
    if not tasks:
        return
    if executor != "local":
        yield from _execute_submitit(fn, tasks, jobs, threads, executor, slurm or SlurmOptions(), folder, name)
        return
    workers = min(jobs or 1, len(tasks))
    if workers == 1:
        for _, _, args in tasks:
            yield fn(*args, threads)
        return
    import multiprocessing

    threads = threads or threads_per_worker(workers)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = [pool.submit(fn, *args, threads) for _, _, args in tasks]
        for fut in as_completed(futures):
            yield fut.result()
    finally:  # on an interrupt, queued runs never start; running ones stop with the pool
        pool.shutdown(wait=True, cancel_futures=True)


def _execute_submitit(fn, tasks, jobs, threads, executor, slurm: SlurmOptions, folder: Path, name: str):
    """The tasks as submitit jobs: one Slurm array (at most `jobs` at once), or LocalExecutor
    subprocesses submitted as slots free up (at most `jobs`, default 1). A job that dies outside fn (killed,
    out of memory, not requeued after a timeout) is an "error" outcome with submitit's message."""
    submitit = import_submitit()
    logs = (folder / SUBMITIT_FOLDER).resolve()
    if executor == "slurm":
        ex = submitit.AutoExecutor(folder=logs, cluster="slurm")
        params = {"name": name, "timeout_min": slurm.time, "cpus_per_task": slurm.cpus}
        if slurm.partition:
            params["slurm_partition"] = slurm.partition
        if jobs:
            params["slurm_array_parallelism"] = jobs
        ex.update_parameters(**params)
        threads, limit, poll = threads or slurm.cpus, len(tasks), 10.0
    else:
        ex = submitit.LocalExecutor(folder=logs)
        ex.update_parameters(timeout_min=slurm.time)
        limit = min(jobs or 1, len(tasks))
        threads, poll = threads or threads_per_worker(limit), 0.2
    task = Resumable(fn)
    pending, running = [(key, path, (*args, threads)) for key, path, args in tasks], {}
    try:
        if executor == "slurm":
            submitted = ex.map_array(task, *zip(*(args for _, _, args in pending)))
            running = {job: item for job, item in zip(submitted, pending)}
            pending = []
        while pending or running:
            while pending and len(running) < limit:
                item = pending.pop(0)
                running[ex.submit(task, *item[2])] = item
            finished = [job for job in running if job.done()]
            for job in finished:
                key, path, _ = running.pop(job)
                try:
                    yield job.result()
                except Exception as exc:  # the job, not fn, failed: fn never raises
                    text = str(exc)
                    yield {"key": key, "path": path, "state": "error", "threads": threads, "seconds": 0.0,
                           "reason": f"submitit job {job.job_id}: {text.strip().splitlines()[0] if text.strip() else type(exc).__name__}",
                           "traceback": f"{type(exc).__name__}: {text}\n(logs in {logs})"}
            if not finished:
                time.sleep(poll)
    finally:  # on an interrupt (or an early close), jobs still queued or running are cancelled
        for job in running:
            try:
                job.cancel(check=False)
            except Exception:  # pragma: no cover - best effort
                pass


def _describe(o: dict) -> str:
    if o["state"] == "complete":
        resumed = f" (resumed from epoch {o['resumed_from']})" if o.get("resumed_from") else ""
        stack = f" (stack of {o['stacked']} on {o['device']})" if o.get("stacked") else ""
        return f"{o['key']}: complete at epoch {o['epoch']}{resumed}{stack} in {o['seconds']:.1f} s"
    if o["state"] == "measured":
        return f"{o['key']}: measured {o['checkpoints']} checkpoints in {o['seconds']:.1f} s"
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
    """`mdlgrok sweep`: 0 when every run is complete (or, --measure-only, every measurement succeeded),
    1 when some failed, 2 on bad input (a missing submitit, no Slurm, a bad experiment)."""
    if a.dry_run:
        exp = load_experiment(a.experiment)
        runs = plan(exp, a.root, a.length)
        shown = [k for k in exp.grid_fields() if k != "epochs"]
        width = max(len(r.key) for r in runs)
        for r in runs:
            state = r.state + (f" (epoch {r.epoch})" if r.state in ("partial", "failed") else "")
            other = find_shared(Path(a.root), r) if r.state == "new" and not a.no_share else None
            state = f"link ({other.parent.name})" if other else state
            values = " ".join(f"{k}={getattr(r.cfg, k)}" for k in shown)
            print(f"{r.key:<{width}}  {state:<17} epochs={r.cfg.epochs} {values}".rstrip())
        counts = {s: sum(r.state == s for r in runs) for s in ("complete", "partial", "new", "failed")}
        print(f"{len(runs)} runs in {Path(a.root) / exp.name}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        return 0
    check_executor(a.executor, a.jobs)  # before anything else: a missing submitit is one line, status 2
    slurm = SlurmOptions(partition=a.slurm_partition, time=a.slurm_time, cpus=a.slurm_cpus)
    common = dict(root=a.root, jobs=a.jobs, length=a.length, executor=a.executor, progress=not a.quiet, slurm=slurm)
    if a.measure_only:
        table = measure_sweep(a.experiment, remeasure=a.remeasure, mode=a.mode, **common)
    else:
        if a.remeasure:
            raise ValueError("--remeasure goes with --measure-only")
        table = run_sweep(a.experiment, share=not a.no_share, stack=a.stack, device=a.device,
                          stack_size=a.stack_size, **common)
    outcomes = table.attrs["outcomes"]
    if a.measure_only:
        bad = [o for o in outcomes if o["state"] == "error"]
        left = [o for o in outcomes if o.get("was") in ("new", "partial")]
    else:
        bad = [o for o in outcomes if o["state"] in ("failed", "error") or o.get("was") == "failed"]
        left = []
    exp = load_experiment(a.experiment)
    print(f"{Path(a.root) / exp.name / TABLE_FILE}: {table.run_id.nunique()} runs, {len(table)} rows"
          + (f"; {len(bad)} failed" if bad else "") + (f"; {len(left)} not complete, not measured" if left else ""))
    return 1 if bad else 0
