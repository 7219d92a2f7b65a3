"""Seconds per checkpoint of every measure of the paper's 1-block transformer (add, p=113).

    make bench-measures                  # or: python benchmarks/bench_measures.py [CHECKPOINT]

Without a checkpoint the model is freshly initialized (the cost does not depend on the weights,
except complexity's, which is left out by default: bench-estimator times it).
"""

from __future__ import annotations

import argparse
import time

import torch

from mdlgrok.config import MeasureConfig, TrainConfig
from mdlgrok.measures import MEASURES
from mdlgrok.models import build_model
from mdlgrok.runs import model_from_checkpoint
from mdlgrok.tasks import make_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("--measures", nargs="+", default=[m for m in MEASURES if m != "complexity"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.checkpoint:
        model, data, epoch, _ = model_from_checkpoint(args.checkpoint)
    else:
        cfg = TrainConfig(task="add", p=113)
        torch.manual_seed(0)
        model, data, epoch = build_model(cfg.model_config()), make_dataset(cfg.task_config()), 0
    cfg = MeasureConfig(measures=tuple(args.measures))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, epoch {epoch}, best of {args.repeat}")
    print(f"{'measure':12} {'seconds':>8}  values")
    for name in args.measures:
        times, rows = [], []
        for _ in range(args.repeat):
            start = time.perf_counter()
            rows = MEASURES[name].measure(model, data, cfg)
            times.append(time.perf_counter() - start)
        values = ", ".join(f"{r['metric']}={r['value']:.4g}" for r in rows)
        print(f"{name:12} {min(times):8.2f}  {values}")


if __name__ == "__main__":
    main()
