"""`mdlgrok sweep` and `mdlgrok convert`: the command-line side of sweeps."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from mdlgrok.config import MeasureConfig
from mdlgrok.runs import RunDir, config_of, convert_run, rename_run
from mdlgrok.sweep.executors import SlurmOptions, check_executor
from mdlgrok.sweep.gather import TABLE_FILE
from mdlgrok.sweep.plan import find_shared, plan
from mdlgrok.sweep.spec import load_experiment, run_key
from mdlgrok.sweep.stages import measure_sweep, run_sweep

KEYED = re.compile(r"-[0-9a-f]{12}$")  # <readable>-<12 hex of the config hash>: a sweep run's folder


def command(a, measure: MeasureConfig | None = None) -> int:
    """`mdlgrok sweep`: 0 when every run is complete (or, --measure-only, every measurement succeeded),
    1 when some failed, 2 on bad input (a missing submitit, no Slurm, a bad experiment)."""
    if a.dry_run:
        return dry_run(a)
    check_executor(a.executor, a.jobs)  # before anything else: a missing submitit is one line, status 2
    slurm = SlurmOptions(partition=a.slurm_partition, time=a.slurm_time, cpus=a.slurm_cpus)
    common = dict(root=a.root, jobs=a.jobs, length=a.length, executor=a.executor, progress=not a.quiet, slurm=slurm)
    if a.measure_only:
        table = measure_sweep(a.experiment, again=a.again, measure=measure, **common)
    else:
        if a.again or measure is not None:
            raise ValueError("--again and the measure options go with --measure-only")
        table = run_sweep(
            a.experiment, share=not a.no_share, stack=a.stack, device=a.device, stack_size=a.stack_size, **common
        )
    outcomes = table.attrs["outcomes"]
    if a.measure_only:
        bad = [o for o in outcomes if o["state"] == "error"]
        left = [o for o in outcomes if o.get("was") in ("new", "partial")]
    else:
        bad = [o for o in outcomes if o["state"] in ("failed", "error") or o.get("was") == "failed"]
        left = []
    exp = load_experiment(a.experiment)
    print(
        f"{Path(a.root) / exp.name / TABLE_FILE}: {table.run_id.nunique()} runs, {len(table)} rows"
        + (f"; {len(bad)} failed" if bad else "")
        + (f"; {len(left)} not complete, not measured" if left else "")
    )
    return 1 if bad else 0


def dry_run(a) -> int:
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


def convert_folder(path: str | Path, estimator_version: str = "unknown") -> list[str]:
    """Convert an older run folder, or every run under an experiment folder or a sweep root, to the
    current layout (runs.convert_run); sweep runs are renamed to their current keys and the links
    between experiments follow. Returns one line per change."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder")
    if RunDir(path).config.exists():
        return [f"converted {path}"] if convert_run(path, estimator_version) else []
    runs = sorted(Path(d) for d, _, files in os.walk(path) if "config.json" in files)  # links not followed
    lines, renamed = [], {}
    for folder in runs:
        if convert_run(folder, estimator_version):
            lines.append(f"converted {folder}")
        key = run_key(config_of(json.loads((folder / "config.json").read_text())))
        if KEYED.search(folder.name) and folder.name != key:  # a sweep's run, named by an older key
            new = folder.with_name(key)
            if new.exists():
                raise ValueError(f"cannot rename {folder} to {new.name}: it exists")
            rename_run(folder, new)
            renamed[folder.resolve()] = new.resolve()
            lines.append(f"renamed {folder} -> {new.name}")
    for link in sorted(p for p in path.glob("**/*") if p.is_symlink()):
        target = (link.parent / os.readlink(link)).resolve()
        if target in renamed:
            new_target = renamed[target]
            link.unlink()
            new_link = link.with_name(new_target.name)
            new_link.symlink_to(os.path.relpath(new_target, new_link.parent), target_is_directory=True)
            lines.append(f"relinked {link} -> {new_link.name}")
    return lines
