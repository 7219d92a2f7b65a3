"""The training loop, the only one: schedule, NaN stop, rows before checkpoint, status, resume, hooks.

    from mdlgrok.training import train
    train(TrainConfig(task="add", preset="ours", epochs=600), "runs/add")

The loop drives an engine (training/single.py: one model; training/stacked.py: N models
of one architecture in lockstep) over one run folder per model. At the paper's evaluation
epochs it writes each model's metric rows, then its checkpoint (rows first: a resume drops
rows past the last checkpoint), then calls `on_checkpoint(run, model, data, epoch, step)`,
the hook through which `train --measure` measures. A model whose epoch loss turns NaN or
infinite is marked failed and frozen; the others go on.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mdlgrok.config import TrainConfig
from mdlgrok.runs import (
    RunDir,
    RunExistsError,
    environment,
    load_checkpoint,
    row,
    rows_to_frame,
    save_checkpoint,
    write_json,
    write_table,
)

ENGINES = ("single", "stacked")


class TrainingFailed(RuntimeError):
    """The loss became NaN or infinite; the run is marked failed and keeps its rows."""


def log_epochs(epochs: int) -> list[int]:
    """The paper's evaluation epochs: distinct int(1.3^n) up to `epochs`, plus the last epoch."""
    points, n = set(), 0
    while int(1.3**n) <= epochs:
        points.add(int(1.3**n))
        n += 1
    return sorted(points | {epochs})


def make_engine(
    configs: list[TrainConfig], engine: str = "single", device: str = "cpu", exact_noise: bool | None = None
):
    if engine == "single":
        if len(configs) != 1 or str(device) != "cpu":
            raise ValueError("the single engine trains one model on the CPU; use engine='stacked'")
        from mdlgrok.training.single import SingleEngine

        return SingleEngine(configs[0])
    if engine == "stacked":
        from mdlgrok.training.stacked import StackedEngine

        return StackedEngine(configs, device, exact_noise)
    raise ValueError(f"unknown engine {engine!r}; choose {' or '.join(ENGINES)}")


class Progress:
    """A tqdm bar on a terminal, one plain line per evaluation otherwise."""

    def __init__(self, total: int, start: int, enabled: bool = True):
        self.enabled, self.tty = enabled, sys.stderr.isatty()
        self.bar = None
        if enabled and self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="epoch", file=sys.stderr)

    def epoch(self) -> None:
        if self.bar:
            self.bar.update(1)

    def report(self, epoch: int, metrics: dict[str, float], who: str = "") -> None:
        if not self.enabled:
            return
        text = who + " ".join(f"{k}={metrics[k]:.4g}" for k in ("train_loss", "train_acc", "test_loss", "test_acc"))
        if self.bar:
            self.bar.set_postfix_str(text)
        else:
            print(f"epoch {epoch}: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def resume_point(cfg: TrainConfig, run: RunDir) -> tuple[dict | None, list[dict]]:
    """What resuming `run` with `cfg` starts from: its last checkpoint (None: nothing to resume)
    and the metric rows recorded up to it. Refuses a folder started with another config."""
    if run.config.exists():
        check_resumable(saved_config(run), cfg, run)
    checkpoints = run.checkpoints()
    if not checkpoints:
        return None, []
    ckpt = load_checkpoint(checkpoints[-1])
    kept = run.read_metrics()
    return ckpt, kept[kept.epoch <= int(ckpt["epoch"])].to_dict("records")


def saved_config(run: RunDir) -> TrainConfig:
    """The config a run folder was started with; an unreadable one is an error naming the file."""
    try:
        return TrainConfig.from_dict(json.loads(run.config.read_text()))
    except (ValueError, TypeError, AttributeError) as exc:  # truncated, not JSON, not a config, older layout
        raise ValueError(f"--resume: cannot read {run.config} ({exc})") from None


def check_resumable(saved: TrainConfig, cfg: TrainConfig, run: RunDir) -> None:
    """A run resumes with the config it started with; only `epochs` may grow."""
    diff = sorted(k for k, v in cfg.to_dict().items() if saved.to_dict()[k] != v and k != "epochs")
    if diff:
        raise ValueError(f"--resume: {run.path} was started with a different config ({', '.join(diff)})")


def train_runs(
    configs: list[TrainConfig],
    paths: list[str | Path],
    *,
    engine: str = "single",
    device: str = "cpu",
    exact_noise: bool | None = None,
    resume: bool = True,
    progress: bool = False,
    on_checkpoint: Callable | None = None,
) -> list[dict]:
    """Train (or resume) one run folder per config with one engine; one outcome per run:
    {"path", "state": complete | failed, "epoch"[, "reason"]}.

    resume=False refuses a folder that holds a run; resume=True continues each run from its
    last checkpoint (every run of a stack must have stopped at the same epoch).
    """
    runs = [RunDir(p) for p in paths]
    eng = make_engine(configs, engine, device, exact_noise)
    rows = [start_run(eng, i, cfg, run, resume) for i, (cfg, run) in enumerate(zip(configs, runs))]
    epochs = configs[0].epochs
    schedule = [e for e in log_epochs(epochs) if e > eng.epoch]
    failed: dict[int, str] = {}
    bar = Progress(epochs, eng.epoch, progress)
    start = time.perf_counter()
    try:
        while eng.epoch < epochs and len(failed) < eng.n:
            for i, loss in enumerate(eng.train_epoch()):
                if i not in failed and not math.isfinite(loss):
                    failed[i] = f"loss became {loss} at epoch {eng.epoch}"
                    eng.freeze(i)
                    runs[i].set_status("failed", reason=failed[i], epoch=eng.epoch)
            bar.epoch()
            if schedule and eng.epoch == schedule[0]:
                schedule.pop(0)
                checkpoint(eng, runs, rows, failed, bar, on_checkpoint)
    finally:
        bar.close()
    return finish(eng, runs, failed, time.perf_counter() - start)


def start_run(eng, i: int, cfg: TrainConfig, run: RunDir, resume: bool) -> list[dict]:
    """Model i's run folder, set up (or resumed: its state loaded); the rows recorded so far."""
    if run.exists() and not resume:
        raise RunExistsError(f"{run.path} already holds a run; pass --resume to continue it or choose another --out")
    ckpt, rows = resume_point(cfg, run) if resume else (None, [])
    if ckpt is not None:
        eng.load_state(i, ckpt)
    elif eng.epoch:
        raise ValueError(f"{run.path} has no checkpoint but the stack resumes from epoch {eng.epoch}")
    write_json(run.config, cfg.to_dict())
    write_json(run.env, environment())
    run.set_status("running", epoch=eng.epoch)
    return rows


def checkpoint(
    eng, runs: list[RunDir], rows: list[list[dict]], failed: dict, bar: Progress, on_checkpoint: Callable | None
) -> None:
    """Evaluate every live model; write its rows, then its checkpoint, then call the hook."""
    for i, metrics in enumerate(eng.metrics()):
        if i in failed:
            continue
        run = runs[i]
        rows[i] += [row(run.run_id, eng.epoch, eng.step, k, v) for k, v in metrics.items()]
        bar.report(eng.epoch, metrics, f"{run.run_id}: " if eng.n > 1 else "")
        write_table(run.metrics, rows_to_frame(rows[i]))
        save_checkpoint(run.checkpoint_path(eng.epoch), eng.state(i))
        if on_checkpoint is not None:
            on_checkpoint(run, eng.model(i), eng.data(i), eng.epoch, eng.step)


def finish(eng, runs: list[RunDir], failed: dict, seconds: float) -> list[dict]:
    out = []
    for i, run in enumerate(runs):
        if i in failed:
            out.append({"path": str(run.path), "state": "failed", "epoch": eng.epoch, "reason": failed[i]})
            continue
        extra = {"stacked": eng.n} if eng.n > 1 else {}
        run.set_status("complete", epoch=eng.epoch, wall_s=round(seconds, 3), **extra)
        out.append({"path": str(run.path), "state": "complete", "epoch": eng.epoch})
    return out


def train(
    cfg: TrainConfig,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    on_checkpoint: Callable | None = None,
) -> dict:
    """Train (or resume) one run into `out` with the single engine; its outcome.
    Raises TrainingFailed when the loss turns NaN or infinite (the rows before it are kept)."""
    outcome = train_runs([cfg], [out], resume=resume, progress=progress, on_checkpoint=on_checkpoint)[0]
    if outcome["state"] == "failed":
        raise TrainingFailed(f"{out}: {outcome['reason']}; kept the rows recorded before it")
    return outcome
