"""What an estimate costs as the model grows, and how much of it is the loss calls.

    make bench-estimator-sizes
    python benchmarks/bench_estimator_sizes.py --widths 256 512 1024 2048 --eps 4 1 0.25

Models mdlgrok did not build, trained briefly on scikit-learn's digits (1,000 training
images): ReLU MLPs 64-w-w-10, two CNNs and an LSTM reading a digit's rows in turn; a bag of
embeddings on synthetic tokens (a 2.6M-entry table that the loss reads by lookups); and the
paper's transformer (add mod 113, untrained). Prints per model: parameters, the payload bytes
at each eps, wall time of one estimate at all eps, loss calls, the time inside them, and the
search's own time per second of loss calls (target: <= 1), each the median of --repeats
estimates after one untimed (the first estimate of a process also pays for torch's and numpy's
start-up).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import pandas as pd
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from mdlgrok.complexity import estimate
from mdlgrok.models import ModelConfig, build_model
from mdlgrok.tasks import TaskConfig, make_dataset
from mdlgrok.training.objective import evaluate


def digits(images: bool):
    d = load_digits()
    x = torch.tensor(d.images if images else d.data, dtype=torch.float32) / 16
    return (x.unsqueeze(1) if images else x)[:1000], torch.tensor(d.target)[:1000]


def mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def cnn(c1: int = 16, c2: int = 32, hidden: int = 40) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c2 * 4 * 4, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


class RowLSTM(nn.Module):
    """An LSTM reading a digit's 8 rows of 8 pixels in turn, classified from its last state."""

    def __init__(self, hidden: int):
        super().__init__()
        self.lstm, self.out = nn.LSTM(8, hidden, batch_first=True), nn.Linear(hidden, 10)

    def forward(self, x):
        return self.out(self.lstm(x.reshape(len(x), 8, 8))[0][:, -1])


VOCAB = 20_000


class BagOfEmbeddings(nn.Module):
    """A tall table (20,000 x 128) read by lookups, then two linear layers: synthetic tokens whose
    first one sets the class. The loss reads few of its rows per call, so it is cheap beside
    the table's size."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.out = nn.Embedding(VOCAB, 128), nn.Linear(128, 128), nn.Linear(128, 10)

    def forward(self, x):
        return self.out(torch.relu(self.fc(self.emb(x).mean(1))))


def fitted(model: nn.Module, x, y, steps: int = 100, lr: float = 1e-3) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def cases(widths: list[int]):
    """(name, model, training inputs, training targets) for every benchmarked model."""
    x, y = digits(images=False)
    for w in widths:
        torch.manual_seed(0)  # each MLP the same whatever the other widths are
        yield f"MLP 64-{w}-{w}-10", fitted(mlp(w), x, y), x, y
    xi, yi = digits(images=True)
    torch.manual_seed(0)
    yield "CNN (2 conv, 2 linear)", fitted(cnn(), xi, yi), xi, yi
    torch.manual_seed(0)
    yield "CNN (2 conv of 32 and 64 channels, 2 linear)", fitted(cnn(32, 64, 256), xi, yi), xi, yi
    torch.manual_seed(0)
    yield "LSTM 256 (a digit's rows in turn)", fitted(RowLSTM(256), x, y), x, y
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2000, 16))
    yield (
        f"bag of embeddings (vocab {VOCAB:,})",
        fitted(BagOfEmbeddings(), tokens, tokens[:, 0] % 10, lr=1e-2),
        tokens,
        tokens[:, 0] % 10,
    )
    data = make_dataset(TaskConfig("add", 113, 0.2, 0))
    torch.manual_seed(0)  # the same transformer whatever was built before it
    yield "paper transformer (add mod 113)", build_model(ModelConfig()), data.x_train, data.y_train


def bench(name: str, model: nn.Module, x, y, eps: list[float], repeats: int = 3) -> dict:
    def loss_fn(m):
        return evaluate(m, x, y)[0]

    def timed() -> tuple[float, list]:
        start = time.perf_counter()
        results = estimate(model, loss_fn, eps)
        return time.perf_counter() - start, results

    timed()  # untimed: warms the caches and thread pools
    runs = [timed() for _ in range(repeats)]
    results = runs[0][1]  # the search is deterministic: every repeat gives the same payloads
    r = results[0]
    return {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "bytes": " / ".join(f"{q.bits // 8:,}" for q in results),
        "wall_s": statistics.median(wall for wall, _ in runs),
        "loss_calls": r.loss_evals,
        "inside_loss_s": statistics.median(rs[0].loss_seconds for _, rs in runs),
        "search_per_loss_s": statistics.median(rs[0].search_over_loss for _, rs in runs),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--eps", type=float, nargs="+", default=[4.0, 1.0, 0.25])
    ap.add_argument("--repeats", type=int, default=3, help="timed estimates per model (default 3), the median reported")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    rows = []
    for name, model, x, y in cases(args.widths):
        rows.append(bench(name, model, x, y, args.eps, args.repeats))
        print(f"{name} done", file=sys.stderr, flush=True)
    print(f"one estimate at eps {args.eps}, {torch.get_num_threads()} torch threads, median of {args.repeats}")
    print(pd.DataFrame(rows).round(2).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
