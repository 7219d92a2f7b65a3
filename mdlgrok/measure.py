"""The measure stage: a run's checkpoints -> its measures table (measures.parquet) and payloads.

    mdlgrok measure runs/add --jobs 2                       # complexity of every checkpoint not yet measured
    mdlgrok measure runs/add --estimator paper --eps 0.5    # another estimator: rows added beside the others
    mdlgrok measure runs/add --measures complexity norms --again

Training never measures by itself: `train --measure` calls `checkpoint_hook` after each
checkpoint it writes, and then `measure_run` for any checkpoint still missing (one measured
before a resume), so a run measured while it trains has the same rows as one measured after.
Every row names its estimator, its version and options; rows of the same (epoch, metric,
eps, codec, estimator, version, options) replace the older ones, all others are kept.
"""

from __future__ import annotations

import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import pandas as pd
import torch

from mdlgrok import mdl
from mdlgrok.config import MeasureConfig
from mdlgrok.measures import MEASURES
from mdlgrok.runs import MEASURE_COLUMNS, RunDir, checkpoint_epoch, model_from_checkpoint, rows_to_frame


def available_cores() -> int:
    """The cores this process may use (its affinity), counted once for every pool here and in sweeps."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not linux
        return os.cpu_count() or 1


def threads_per_worker(workers: int) -> int:
    """torch threads for each of `workers` processes, so that together they fill the cores once."""
    return max(1, available_cores() // workers)


def measure_model(
    model: torch.nn.Module, data, cfg: MeasureConfig, run_id: str, epoch: int, step: int, payloads: Path | None = None
) -> list[dict]:
    """Rows of every measure of cfg on one model."""
    rows = []
    for name in cfg.measures:
        for r in MEASURES[name].measure(model, data, cfg, payloads, epoch):
            rows.append(
                {"run_id": run_id, "epoch": int(epoch), "step": int(step), "eps": float("nan"), "codec": "", **r}
            )
    return rows


def measure_checkpoint(path: str, cfg: MeasureConfig, threads: int | None = None) -> list[dict]:
    """Rows of one checkpoint file (in a worker process of measure_run)."""
    if threads:
        torch.set_num_threads(threads)
    model, data, epoch, step = model_from_checkpoint(path)
    run = RunDir(Path(path).parent.parent)
    return measure_model(model, data, cfg, run.run_id, epoch, step, run.payloads)


def missing_checkpoints(run: RunDir, cfg: MeasureConfig) -> list[Path]:
    """The run's checkpoints that lack some row cfg would write."""
    m = run.read_measures()
    have = set(
        zip(
            m.epoch.astype(int),
            m.estimator,
            m.estimator_version,
            m.options,
            [None if pd.isna(e) else float(e) for e in m.eps],
        )
    )
    want = set().union(*(MEASURES[name].expected(cfg) for name in cfg.measures))
    return [c for c in run.checkpoints() if any((checkpoint_epoch(c), *w) not in have for w in want)]


def measure_run(
    run_path: str | Path, cfg: MeasureConfig | None = None, jobs: int = 1, again: bool = False, progress: bool = True
) -> pd.DataFrame:
    """Measure a run's checkpoints (those not measured yet with this config, or all with `again`)
    into its measures table; returns the new rows."""
    cfg = cfg or MeasureConfig()
    run = RunDir(run_path)
    if not run.checkpoints():
        raise FileNotFoundError(f"{run_path} holds no checkpoints")
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    todo = run.checkpoints() if again else missing_checkpoints(run, cfg)
    new: list[pd.DataFrame] = []  # each checkpoint's rows are written as it finishes: a stop loses those in flight
    if jobs == 1 or len(todo) < 2:
        for i, path in enumerate(todo):
            new.append(run.add_measures(measure_checkpoint(str(path), cfg)))  # in-process: caller's threads
            _progress(progress, i + 1, len(todo), path)
    else:
        workers = min(jobs, len(todo))
        with ProcessPoolExecutor(workers, mp_context=torch.multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(measure_checkpoint, str(p), cfg, threads_per_worker(workers)): p for p in todo}
            try:
                for i, fut in enumerate(as_completed(futures)):  # written in the order they finish
                    new.append(run.add_measures(fut.result()))
                    _progress(progress, i + 1, len(todo), futures[fut])
            except BaseException:
                pool.shutdown(cancel_futures=True)  # the checkpoints not started yet are left for next time
                raise
    return pd.concat(new, ignore_index=True) if new else rows_to_frame([], MEASURE_COLUMNS)  # nothing to write


def checkpoint_hook(cfg: MeasureConfig):
    """on_checkpoint for the training loop: measure the model just checkpointed into the run's table."""

    def on_checkpoint(run: RunDir, model, data, epoch: int, step: int) -> None:
        run.add_measures(measure_model(model, data, cfg, run.run_id, epoch, step, run.payloads))

    return on_checkpoint


def _progress(enabled: bool, done: int, total: int, path: Path) -> None:
    if enabled:
        print(f"measured {done}/{total}: {path.name}", file=sys.stderr, flush=True)


def checkpoint_report(path: str, cfg: MeasureConfig | None = None, accuracy_drop: float | None = None) -> str:
    """A readable report of one checkpoint's complexity, with the kl bound on the test error each
    description gives (n = the training examples, delta 0.05). accuracy_drop adds a row for the
    shortest description whose training accuracy stays within it of the original's (no loss limit)."""
    from mdlgrok.measures.complexity import accuracy_result, run_estimator

    cfg = cfg or MeasureConfig()
    model, data, epoch, _ = model_from_checkpoint(path)
    results = run_estimator(model, data, cfg)
    last = results[-1]  # the last eps asked: its choices are printed
    if accuracy_drop is not None:
        results.append(accuracy_result(model, data, accuracy_drop))
    r0, n = results[0], len(data.y_train)
    lines = [
        f"{path}: epoch {epoch}, {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"train loss {r0.base_loss:.4g} nats, estimator {cfg.estimator} "
        f"({r0.loss_evals} loss calls, {r0.seconds:.1f} s, {r0.loss_seconds:.1f} s inside the loss calls)",
        f"naive size (bzip2 of float32 weights): {r0.naive_bits // 8:,} bytes; errors measured in "
        f"{r0.norms + ' norms' if r0.norms else 'one global bin and rank fraction (the paper search)'}",
        f"{'eps':>11} {'bytes':>9} {'codec':>10} {'ratio':>7} {'coarse loss':>12} {'train acc':>9} "
        f"{'test acc':>9} {'kl bound':>9}",
    ]
    for r in results:
        train_acc = r.extra.get("coarse_train_acc", float("nan"))
        bound = mdl.kl_bound(1 - train_acc, r.bits, n) if train_acc == train_acc else float("nan")
        label = f"{r.eps:11.4g}" if r.eps < float("inf") else f"acc>={math.floor(r.min_accuracy * 1e4) / 1e4:.4f}"
        lines.append(
            f"{label} {r.bits // 8:9,} {r.codec:>10} {r.ratio:7.1f} {r.coarse_loss:12.4g} {train_acc:9.4f} "
            f"{r.extra.get('coarse_test_acc', float('nan')):9.3f} {bound:9.3f}"
        )
    lines.append(
        f"choices at eps {last.eps:g}: "
        + ", ".join(
            f"{c['name']}={c['kind']}"
            + (f"(k={c['rank']})" if c["kind"] == "lowrank" else "")
            + (f"[{c['rows']} rows]" if c.get("rows") else "")
            + (f"[Fourier {c['fourier']}]" if c.get("fourier") else "")
            + ("[transposed]" if c.get("transposed") else "")
            for c in last.choices
            if c["kind"] != "raw"
        )
    )
    return "\n".join(lines)
