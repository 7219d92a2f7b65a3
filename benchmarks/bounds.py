"""Generalization bounds from the shortest descriptions of grokked networks: under the loss
constraint (eps nats) and under the accuracy constraint (training accuracy kept, no loss limit).

    make results/estimator/bounds.csv          # the add "ours" runs of rise_and_fall, last checkpoint
    python benchmarks/bounds.py RUN [RUN ...] [--eps 0.5] [--drops 0 0.01] [--out bounds.csv]

Per run and constraint: bytes, the coarse model's training error and test accuracy, the kl and
Catoni bounds on its test error (n = training examples, delta 0.05; mdlgrok.mdl), and the
longest description for which the kl bound beats chance (1 - 1/p) at that training error.
Each row's bounds hold with probability 1 - delta on their own; to pick the best of a run's k
rows after the fact, pay ln k more (a union bound).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from mdlgrok import mdl
from mdlgrok.complexity import VERSION
from mdlgrok.config import MeasureConfig
from mdlgrok.measures.complexity import accuracy_result, run_estimator
from mdlgrok.runs import RunDir, model_from_checkpoint

DELTA = 0.05


def bound_row(run: Path, epoch: int, constraint: str, r, n: int, classes: int) -> dict:
    train_err = 1 - r.extra["coarse_train_acc"]
    bits = r.bits
    chance_bits = mdl.nonvacuous_bits(train_err, n, DELTA, threshold=1 - 1 / classes)
    return {
        "run": run.name,
        "epoch": epoch,
        "constraint": constraint,
        "bytes": bits // 8,
        "coarse_train_err": train_err,
        "coarse_test_acc": r.extra["coarse_test_acc"],
        "n_train": n,
        "kl": mdl.kl_bound(train_err, bits, n, DELTA),
        "catoni": mdl.catoni_bound(train_err, bits, n, DELTA),
        "chance": 1 - 1 / classes,
        "nonvacuous_bytes_kl": chance_bits / 8,
        "over_nonvacuous": bits / chance_bits if chance_bits > 0 else float("inf"),
        "estimator_version": VERSION,
    }


def run_bounds(run: Path, eps: list[float], drops: list[float]) -> list[dict]:
    checkpoints = RunDir(run).checkpoints()
    if not checkpoints:
        print(f"bounds: {run} holds no checkpoints; skipped", file=sys.stderr)
        return []
    path = checkpoints[-1]
    model, data, epoch, _ = model_from_checkpoint(path)
    n, classes = len(data.y_train), 10 if data.config.task == "digits" else data.config.p
    rows = [
        bound_row(run, epoch, f"loss, eps {r.eps:g}", r, n, classes)
        for r in run_estimator(model, data, MeasureConfig(eps=eps))
    ]
    for drop in drops:
        rows.append(bound_row(run, epoch, f"accuracy, drop {drop:g}", accuracy_result(model, data, drop), n, classes))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.5])
    ap.add_argument("--drops", type=float, nargs="+", default=[0.0])
    ap.add_argument("--out", help="write the table here (csv)")
    args = ap.parse_args()
    rows = []
    for run in args.runs:
        new = run_bounds(run, args.eps, args.drops)
        rows += new
        if new:
            print(pd.DataFrame(new).drop(columns="estimator_version").to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
