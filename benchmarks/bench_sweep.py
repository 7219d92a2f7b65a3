"""Sweep throughput: 4 paper-size runs through the local executor against one after another.

    python benchmarks/bench_sweep.py --epochs 200         # (make bench-sweep)

The runs are the paper's 1-block transformer on add mod 113 with "ours", seeds 0-3, without
complexity measuring. "sequential" trains them in this process with torch's default threads;
"local" is `mdlgrok sweep --jobs J`: J processes with cores // J threads each.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from mdlgrok.config import TrainConfig
from mdlgrok.sweep import run_sweep
from mdlgrok.training import train


def experiment(epochs: int, runs: int) -> dict:
    return {
        "name": "bench",
        "base": {"task": "add", "p": 113, "preset": "ours", "epochs": epochs},
        "grid": {"seed": list(range(runs))},
    }


def sequential(epochs: int, runs: int, root: str) -> float:
    start = time.perf_counter()
    for seed in range(runs):
        train(
            TrainConfig(task="add", p=113, preset="ours", epochs=epochs, seed=seed), f"{root}/seq{seed}", progress=False
        )
    return time.perf_counter() - start


def local(epochs: int, runs: int, jobs: int, root: str) -> float:
    start = time.perf_counter()
    run_sweep(experiment(epochs, runs), root=root, jobs=jobs, progress=False)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        t_seq = sequential(args.epochs, args.runs, root)
        t_loc = local(args.epochs, args.runs, args.jobs, f"{root}/sweep")
    print(
        f"{args.runs} runs x {args.epochs} epochs, {os.cpu_count()} cores, torch default threads "
        f"{torch.get_num_threads()}"
    )
    print(f"{'mode':28} {'wall s':>8} {'runs/min':>9}")
    print(f"{'sequential (default threads)':28} {t_seq:8.1f} {60 * args.runs / t_seq:9.2f}")
    print(f"{f'local executor, jobs={args.jobs}':28} {t_loc:8.1f} {60 * args.runs / t_loc:9.2f}")
    print(f"speed-up local / sequential: {t_seq / t_loc:.2f}x")


if __name__ == "__main__":
    main()
