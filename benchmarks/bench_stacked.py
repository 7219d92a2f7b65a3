"""Model-steps per second of N stacked copies of the paper's 1-block transformer (p=113, batch 512).

    python benchmarks/bench_stacked.py --n 1 8 64 --device cuda --steps 50
    python benchmarks/bench_stacked.py --n 1 4 --device cpu --steps 5     # a quick check on CPU

One stacked step trains all N models (different seeds, per-model noise and spectral penalty) on
a 512-example minibatch each; model-steps/s = N * steps/s. Ratios are against N = 1 stacked,
measured in the same run (and, on CPU, the single engine's step of bench_train.py is shown too).
The issue's aim on a GPU: 64 models at more than 20x the model-steps per second of one.
"""

from __future__ import annotations

import argparse
import time

import torch

from mdlgrok.config import TrainConfig
from mdlgrok.training.stacked import StackedEngine


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ms_per_stacked_step(
    n: int,
    preset: str,
    steps: int,
    device: torch.device,
    warmup: int = 3,
    exact_noise: bool | None = None,
    batch: int = 512,
) -> float:
    configs = [TrainConfig(task="add", p=113, preset=preset, epochs=1, batch=batch, seed=s) for s in range(n)]
    st = StackedEngine(configs, device=device, exact_noise=exact_noise)
    idx = torch.arange(batch, device=device).expand(n, batch)  # the first 512 examples of each model's split
    for _ in range(warmup):
        st.train_step(idx)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        st.train_step(idx)
    sync(device)
    return 1000 * (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1, 8, 64], help="stack sizes (1 is always measured)")
    ap.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when torch sees a GPU"
    )
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--preset", default="ours", choices=["none", "wd", "ours"])
    ap.add_argument(
        "--exact-noise",
        action="store_true",
        help="draw noise on each model's CPU generator as WeightNoise (default only on CPU)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--trainer", action="store_true", help="also time one plain Trainer step (CPU only)")
    args = ap.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    sizes = sorted(set(args.n) | {1})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"torch {torch.__version__}, {name}; 1-block transformer p=113, batch 512, preset {args.preset}, "
        f"{args.steps} timed steps after {args.warmup} warm-up"
    )
    print(f"{'N':>5} {'ms/step':>9} {'model-steps/s':>14} {'vs N=1':>8}")
    if args.trainer and device.type == "cpu":
        import bench_train

        ms = bench_train.ms_per_step(args.preset, args.steps)
        print(f"{'Trainer':>5} {ms:9.1f} {1000 / ms:14.1f}")
    base = None
    for n in sizes:
        ms = ms_per_stacked_step(n, args.preset, args.steps, device, args.warmup, args.exact_noise or None)
        rate = 1000 * n / ms
        base = base or rate
        print(f"{n:>5} {ms:9.1f} {rate:14.1f} {rate / base:7.2f}x", flush=True)


if __name__ == "__main__":
    main()
