"""The two stages of a sweep, on any executor: training (runs or stacks) and measuring.

A task trains one run and then, when the experiment measures, measures it through the same
stage as `mdlgrok measure` (measure.measure_run), so a run is finished, tables and all,
before the next task needs its core. Stacks (several runs in one process, mostly on a GPU)
train first; their runs are then measured as tasks of their own. Workers never raise: each
returns an outcome dict (complete, failed, measured or error with its traceback).
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import pandas as pd

from mdlgrok.config import MeasureConfig, TrainConfig
from mdlgrok.runs import RunDir, checkpoint_epoch
from mdlgrok.sweep.executors import SlurmOptions, check_executor, execute, resolve_device, use_stacks
from mdlgrok.sweep.gather import gather
from mdlgrok.sweep.plan import PlannedRun, plan, share_runs, stack_groups
from mdlgrok.sweep.spec import load_experiment


# ---------------------------------------------------------------- workers (in executor processes)
def _set_threads(threads: int | None) -> int:
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _error(exc: Exception) -> dict:
    return {"state": "error", "reason": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def train_one(cfg_dict: dict, path: str, measure: dict | None = None, threads: int | None = None) -> dict:
    """Train (or resume) one run, then measure what it lacks when `measure` (a MeasureConfig dict)
    is given. A diverged run is "failed"; a bug is "error" with its traceback."""
    from mdlgrok.training import TrainingFailed, train

    start = time.perf_counter()
    outcome = {
        "key": Path(path).name,
        "path": path,
        "threads": _set_threads(threads),
        "resumed_from": RunDir(path).last_checkpoint_epoch(),
    }
    try:
        # resume=True continues a partial run from its last checkpoint and starts a new one afresh
        outcome.update(train(TrainConfig.from_dict(cfg_dict), path, resume=True, progress=False))
        outcome["key"] = Path(path).name
        if measure is not None:
            outcome["measured"] = _measure(path, measure, threads)
    except TrainingFailed as exc:
        outcome.update(state="failed", reason=str(exc))
    except Exception as exc:  # a bug, not a diverged run: reported with its traceback, the others go on
        outcome.update(_error(exc))
    outcome["seconds"] = time.perf_counter() - start
    return outcome


def train_stack(cfg_dicts: list[dict], paths: list[str], device: str = "cpu", threads: int | None = None) -> list[dict]:
    """Train (or resume) runs together as one stack; one outcome per run."""
    from mdlgrok.training import train_runs

    start = time.perf_counter()
    base = {"threads": _set_threads(threads), "stacked": len(paths), "device": device}
    resumed = [RunDir(p).last_checkpoint_epoch() for p in paths]
    try:
        results = train_runs([TrainConfig.from_dict(d) for d in cfg_dicts], paths, engine="stacked", device=device)
        outcomes = [{"key": Path(r["path"]).name, **base, **r} for r in results]
    except Exception as exc:  # a bug or a bad stack: every run of it is reported, the other stacks go on
        outcomes = [{"key": Path(p).name, "path": p, **base, **_error(exc)} for p in paths]
    for o, epoch in zip(outcomes, resumed):
        o.update(seconds=time.perf_counter() - start, resumed_from=epoch)
    return outcomes


def measure_one(path: str, measure: dict, again: bool = False, threads: int | None = None) -> dict:
    """Measure one run's checkpoints (all with `again`, else those lacking rows); an outcome."""
    start = time.perf_counter()
    outcome = {"key": Path(path).name, "path": path, "threads": _set_threads(threads)}
    try:
        outcome.update(state="measured", checkpoints=_measure(path, measure, threads, again))
    except Exception as exc:
        outcome.update(_error(exc))
    outcome["seconds"] = time.perf_counter() - start
    return outcome


def _measure(path: str, measure: dict, threads: int | None, again: bool = False) -> int:
    import torch
    from threadpoolctl import threadpool_limits

    from mdlgrok.measure import measure_run

    with threadpool_limits(threads or torch.get_num_threads()):  # numpy's BLAS (the SVDs) too
        new = measure_run(path, MeasureConfig(**measure), jobs=1, again=again, progress=False)
    return int(new.epoch.nunique())


# ---------------------------------------------------------------- orchestration
def run_sweep(
    experiment,
    root: str | Path = "runs",
    jobs: int | None = None,
    length: str | None = None,
    executor: str = "local",
    progress: bool = True,
    threads: int | None = None,
    slurm: SlurmOptions | None = None,
    share: bool = True,
    stack: str = "auto",
    device: str = "auto",
    stack_size: int = 64,
) -> pd.DataFrame:
    """Run what is missing of an experiment's grid, measure what its [measure] asks, and return
    the gathered table (also written to <root>/<name>/table.parquet).

    Complete runs are not trained again (those with a checkpoint that has no measure row at all
    are measured, as `mdlgrok measure` would), partial ones resume, the rest start; with `share`, a new run
    complete under another experiment of the same root is linked. Stacks (`stack`: auto, on,
    off): with "on", or "auto" on a GPU, runs that share architecture, data shapes and resume
    epoch train together (at most `stack_size` per stack, one task each); otherwise each run is
    one task. executor="local": `jobs` processes (default 1; jobs=1 runs here), `threads`
    torch threads each (default cores // jobs); "slurm": one job array through submitit, at
    most `jobs` at once, `slurm` resources per job; "submitit-local": submitit's
    LocalExecutor. Outcomes are in `table.attrs["outcomes"]`.
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
    say(
        f"sweep {exp.name}: {len(runs)} runs, {sum(r.state == 'complete' for r in runs)} complete, "
        f"{sum(r.state == 'failed' for r in runs)} failed earlier, {len(todo)} to run"
        + (f" {_where(executor, jobs, len(todo))}" if todo else "")
    )
    outcomes = [{"key": r.key, "path": str(r.path), "state": "skipped", "was": r.state, "epoch": r.epoch} for r in done]
    for r in done:
        if r.state == "failed":
            say(f"  {r.key}: failed earlier (status.json); skipped")
    measure = exp.measure.to_dict() if exp.measure else None
    run = dict(jobs=jobs, threads=threads, executor=executor, slurm=slurm, folder=Path(root) / exp.name)
    if not stacked:
        tasks = [(r.key, p, (r.cfg.to_dict(), p, measure)) for r in todo for p in [_job_path(r.path, executor)]]
        outcomes += _run(train_one, tasks, f"mdlgrok-{exp.name}", say, **run)
    else:
        stacks = stack_groups(todo, stack_size)
        if stacks:
            sizes = ", ".join(str(len(g)) for g in stacks)
            say(f"  as {len(stacks)} stack{'s' * (len(stacks) > 1)} on {device}: {sizes} runs")
        tasks = [
            (g[0].key, str(g[0].path), ([r.cfg.to_dict() for r in g], [_job_path(r.path, executor) for r in g], device))
            for g in stacks
        ]
        outcomes += _run(train_stack, tasks, f"mdlgrok-{exp.name}", say, **run)
    if measure is not None:
        # stacks train first and measure afterwards; a single run was measured in its own task
        trained = [r for r in todo if RunDir(r.path).read_status().get("state") == "complete"] if stacked else []
        stopped = [r for r in done if r.state == "complete" and _unmeasured(r.path)]
        if stopped:
            say(f"  {len(stopped)} complete run{'s' * (len(stopped) > 1)} with checkpoints never measured: measuring")
        if trained or stopped:
            tasks = _measure_tasks(trained + stopped, measure, False, executor)
            measured = _run(measure_one, tasks, f"mdlgrok-measure-{exp.name}", say, **run)
            outcomes += [o for o in measured if o["state"] == "error"]
    return _gather(root, exp, runs, outcomes)


def _unmeasured(path: Path) -> bool:
    """Whether some checkpoint of a run has no measure row at all (its measuring was stopped
    part-way, or the run was never measured)."""
    run = RunDir(path)
    measured = set(run.read_measures().epoch.astype(int))
    return any(checkpoint_epoch(c) not in measured for c in run.checkpoints())


def measure_sweep(
    experiment,
    root: str | Path = "runs",
    jobs: int | None = None,
    length: str | None = None,
    executor: str = "local",
    progress: bool = True,
    threads: int | None = None,
    slurm: SlurmOptions | None = None,
    again: bool = False,
    measure: MeasureConfig | None = None,
) -> pd.DataFrame:
    """Measure the checkpoints of the experiment's complete runs, as a stage of its own, with
    `measure` (default: the experiment's [measure], else MeasureConfig()); return the gathered
    table. Each run lacking some row is one task (every complete run with `again`); rows of
    the same key are replaced, others kept. Runs not complete are left alone."""
    check_executor(executor, jobs)
    exp = load_experiment(experiment)
    cfg = measure or exp.measure or MeasureConfig()
    runs = plan(exp, root, length)
    say = _say(progress)
    share_runs(runs, root, say)  # complete runs of the same config in sibling experiments are linked
    complete = [r for r in runs if r.state == "complete"]
    from mdlgrok.measure import missing_checkpoints

    todo = [r for r in complete if again or missing_checkpoints(RunDir(r.path), cfg)]
    say(
        f"measure {exp.name}: {len(runs)} runs, {len(complete)} complete, "
        f"{len(complete) - len(todo)} measured already, {len(todo)} to measure"
        + (f" {_where(executor, jobs, len(todo))}" if todo else "")
    )
    outcomes, chosen = [], {r.key for r in todo}
    for r in runs:
        if r.state != "complete":
            say(f"  {r.key}: {r.state}, not measured" + (" (run the sweep first)" if r.state != "failed" else ""))
            outcomes.append({"key": r.key, "path": str(r.path), "state": "skipped", "was": r.state})
        elif r.key not in chosen:
            outcomes.append({"key": r.key, "path": str(r.path), "state": "skipped", "was": "measured"})
    outcomes += _run(
        measure_one,
        _measure_tasks(todo, cfg.to_dict(), again, executor),
        f"mdlgrok-measure-{exp.name}",
        say,
        jobs=jobs,
        threads=threads,
        executor=executor,
        slurm=slurm,
        folder=Path(root) / exp.name,
    )
    return _gather(root, exp, runs, outcomes)


def _measure_tasks(runs: list[PlannedRun], measure: dict, again: bool, executor: str) -> list[tuple[str, str, tuple]]:
    return [(r.key, p, (p, measure, again)) for r in runs for p in [_job_path(r.path, executor)]]


def _run(fn, tasks, job_name: str, say, *, jobs, threads, executor, slurm, folder) -> list[dict]:
    """Run the tasks on the executor; report and return each outcome (a stack gives one per run)."""
    outcomes = []
    for i, result in enumerate(execute(fn, tasks, jobs, threads, executor, slurm, folder, job_name), 1):
        for outcome in result if isinstance(result, list) else [result]:
            outcomes.append(outcome)
            say(f"[{i}/{len(tasks)}] {describe(outcome)}")
            if outcome["state"] == "error":
                say(outcome["traceback"].rstrip())
    return outcomes


def _gather(root, exp, runs: list[PlannedRun], outcomes: list[dict]) -> pd.DataFrame:
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


def describe(o: dict) -> str:
    """One line of an outcome."""
    if o["state"] == "complete":
        resumed = f" (resumed from epoch {o['resumed_from']})" if o.get("resumed_from") else ""
        stack = f" (stack of {o['stacked']} on {o['device']})" if o.get("stacked") else ""
        measured = f", measured {o['measured']} checkpoints" if o.get("measured") is not None else ""
        return f"{o['key']}: complete at epoch {o['epoch']}{resumed}{stack}{measured} in {o['seconds']:.1f} s"
    if o["state"] == "measured":
        return f"{o['key']}: measured {o['checkpoints']} checkpoints in {o['seconds']:.1f} s"
    if o["state"] == "failed":
        return f"{o['key']}: FAILED: {o['reason']}"
    return f"{o['key']}: ERROR: {o['reason']}"
