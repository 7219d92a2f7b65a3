"""Sweeps: experiment files (spec) -> planned runs (plan) -> tasks on executors (stages) -> one table (gather).

mdlgrok sweep experiments/rise_and_fall.toml --jobs 2              # train, then measure each run
mdlgrok sweep experiments/rise_and_fall.toml --length paper --dry-run
mdlgrok sweep experiments/rise_and_fall.toml --executor slurm --slurm-partition cpu   # pip install submitit
mdlgrok sweep experiments/rise_and_fall.toml --measure-only --jobs 2                 # measuring as its own stage
mdlgrok sweep experiments/regularizers.toml --device cuda --stack-size 64             # stacks of runs on a GPU
"""

from mdlgrok.sweep.gather import TABLE_FILE, gather
from mdlgrok.sweep.plan import PlannedRun, plan
from mdlgrok.sweep.spec import Experiment, expand, load_experiment, run_key
from mdlgrok.sweep.stages import measure_sweep, run_sweep

__all__ = [
    "TABLE_FILE",
    "Experiment",
    "PlannedRun",
    "expand",
    "gather",
    "load_experiment",
    "measure_sweep",
    "plan",
    "run_key",
    "run_sweep",
]
