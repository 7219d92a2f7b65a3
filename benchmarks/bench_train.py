"""Optimizer steps per second of the paper's 1-block transformer (p=113) at batch 512.

    make bench-train            # or: python benchmarks/bench_train.py --steps 60

Reference: the paper's own JAX code, run on 2 CPU cores, takes 25 ms per step without
regularizers and 83 ms with "ours" (DeMoss et al. 2024 code, measured here); the ratios below are against those.
Then the parts of the "ours" step beside the budget that a step of at most 1.5x the
unregularized one leaves them (half the unregularized step): the spectral penalty's value and
gradient, the float64 eigendecomposition of the Gram matrices inside it, and the noise.
Where torch sees a GPU, one model is also timed there (a stack of one, training/stacked.py, the
GPU training path) against the CPU step measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch

from mdlgrok.config import TrainConfig
from mdlgrok.regularizers import mean_spectral_entropy, weight_matrices
from mdlgrok.training.single import SingleEngine

PAPER_MS = {"none": 25.0, "ours": 83.0}


def ms_per_call(fn, calls: int) -> float:
    """Milliseconds per call of fn, after 5 untimed calls."""
    for _ in range(5):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1000 * (time.perf_counter() - start) / calls


def ms_per_step(preset: str, steps: int, batch: int = 512) -> float:
    """The single engine's own train_step (noise, loss, penalty, backward, AdamW) on one minibatch."""
    engine = SingleEngine(TrainConfig(task="add", p=113, preset=preset, epochs=1, batch=batch))
    idx = torch.arange(batch)
    return ms_per_call(lambda: engine.train_step(idx), steps)


def ours_parts(steps: int) -> dict[str, float]:
    """ms per call of each regularizer's part of an "ours" step, on the model as initialized."""
    engine = SingleEngine(TrainConfig(task="add", p=113, preset="ours", epochs=1))
    model = engine.model()

    def penalty() -> None:
        model.zero_grad(set_to_none=True)
        mean_spectral_entropy(model).backward()

    by_size: dict[int, list[torch.Tensor]] = {}
    for w in weight_matrices(model):
        w = w.detach().double()
        by_size.setdefault(min(w.shape), []).append(w.mT @ w if w.shape[0] >= w.shape[1] else w @ w.mT)
    grams = [torch.stack(g) for g in by_size.values()]  # one batched eigh per size, as the penalty does

    def noise() -> None:
        engine.noise.add()
        engine.noise.remove()

    return {
        "spectral penalty, value and gradient": ms_per_call(penalty, steps),
        f"  of which eigh of its {sum(map(len, grams))} Gram matrices (float64)": ms_per_call(
            lambda: [torch.linalg.eigh(g) for g in grams], steps
        ),
        "noise, drawn, added and removed": ms_per_call(noise, steps),
    }


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
    ratio = cpu["ours"] / cpu["none"]
    print(f'"ours" at {ratio:.2f}x the unregularized step; at 1.5x its extra parts get {cpu["none"] / 2:.1f} ms:')
    for part, ms in ours_parts(args.steps).items():
        print(f"  {part:58} {ms:6.1f} ms")
    if torch.cuda.is_available():
        from bench_stacked import ms_per_stacked_step

        print(f"GPU {torch.cuda.get_device_name()}: one model as a stack of one")
        print(f"{'preset':8} {'ms/step':>8} {'steps/s':>8} {'vs CPU':>9}")
        for preset in ("none", "ours"):
            ms = ms_per_stacked_step(1, preset, args.steps, torch.device("cuda"))
            print(f"{preset:8} {ms:8.1f} {1000 / ms:8.1f} {cpu[preset] / ms:8.2f}x")


if __name__ == "__main__":
    main()
