"""Optimizer steps per second of the paper's 1-block transformer (p=113) at batch 512.

    make bench-train            # or: python benchmarks/bench_train.py --steps 60

Reference: the paper's own JAX code, run on 2 CPU cores, takes 25 ms per step without
regularizers and 83 ms with "ours" (DeMoss et al. 2024 code, measured here); the ratios below are against those.
Where torch sees a GPU, one model is also timed there (a stack of one, training/stacked.py, the
GPU training path) against the CPU step measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch

from mdlgrok.config import TrainConfig
from mdlgrok.training.single import SingleEngine

PAPER_MS = {"none": 25.0, "ours": 83.0}


def ms_per_step(preset: str, steps: int, batch: int = 512) -> float:
    """The single engine's own train_step (noise, loss, penalty, backward, AdamW) on one minibatch."""
    engine = SingleEngine(TrainConfig(task="add", p=113, preset=preset, epochs=1, batch=batch))
    idx = torch.arange(batch)
    for _ in range(5):
        engine.train_step(idx)
    start = time.perf_counter()
    for _ in range(steps):
        engine.train_step(idx)
    return 1000 * (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 512, 1-block transformer p=113")
    print(f"{'preset':8} {'ms/step':>8} {'steps/s':>8} {'paper ms':>9} {'speed-up':>9} {'vs none':>8}")
    cpu = {}
    for preset in ("none", "ours"):
        ms = cpu[preset] = ms_per_step(preset, args.steps)
        print(
            f"{preset:8} {ms:8.1f} {1000 / ms:8.1f} {PAPER_MS[preset]:9.1f} {PAPER_MS[preset] / ms:8.2f}x "
            f"{ms / cpu['none']:7.2f}x"
        )
    if torch.cuda.is_available():
        from bench_stacked import ms_per_stacked_step

        print(f"GPU {torch.cuda.get_device_name()}: one model as a stack of one")
        print(f"{'preset':8} {'ms/step':>8} {'steps/s':>8} {'vs CPU':>9}")
        for preset in ("none", "ours"):
            ms = ms_per_stacked_step(1, preset, args.steps, torch.device("cuda"))
            print(f"{preset:8} {ms:8.1f} {1000 / ms:8.1f} {cpu[preset] / ms:8.2f}x")


if __name__ == "__main__":
    main()
