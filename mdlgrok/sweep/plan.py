"""Planning a sweep: each run's folder and state (new, partial, complete, failed), runs shared
across experiments of one root, and the stacks that train together."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from mdlgrok.config import TrainConfig, canonical
from mdlgrok.runs import RunDir
from mdlgrok.sweep.spec import expand, load_experiment, run_key
from mdlgrok.training.stacked import SHARED_FIELDS


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
            raise ValueError(
                f"{run.config} is unreadable ({exc}); convert it (mdlgrok convert) or remove the run folder"
            ) from None
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


def stack_groups(runs: list[PlannedRun], size: int) -> list[list[PlannedRun]]:
    """Runs that train as one stack: the same shared fields (training/stacked.py SHARED_FIELDS) and the
    same resume epoch (their last checkpoint), at most `size` runs per stack, in plan order."""
    if size < 1:
        raise ValueError(f"--stack-size must be at least 1, got {size}")
    groups: dict[tuple, list[PlannedRun]] = {}
    for r in runs:
        key = (*(getattr(r.cfg, f) for f in SHARED_FIELDS), RunDir(r.path).last_checkpoint_epoch())
        groups.setdefault(key, []).append(r)
    return [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]
