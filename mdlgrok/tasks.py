"""The tasks and their seeded train/test splits.

Modular arithmetic (DeMoss et al. 2024, sec. 4): every example is the token sequence
``[a, OP, b, EQ]`` with ``OP = p`` and ``EQ = p + 1`` (vocabulary ``p + 2``); the target is
``c = a op b (mod p)``.

Digits (Omnigrok's recipe for grokking beyond algorithms, Liu et al. 2023, on scikit-learn's
8x8 digits, which ship with it): 1,797 images of 64 pixels scaled to [0, 1], target the digit;
by default 1,000 training images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# name -> (c(a, b, p) on int64 tensors, paper's train fraction)
OPERATIONS = {
    "add": (lambda a, b, p: (a + b) % p, 0.2),
    "sub": (lambda a, b, p: (a - b) % p, 0.3),
    "mul": (lambda a, b, p: (a * b) % p, 0.2),
    "div": (lambda a, b, p: (a * _inverse(b, p)) % p, 0.3),
    "sq": (lambda a, b, p: (a * a + b * b) % p, 0.4),
    "quad": (lambda a, b, p: (a * a + a * b + b * b) % p, 0.6),
}
# The paper trains sub and div with two transformer blocks, the others with one; the digits
# MLP has two hidden layers (Omnigrok's 64-200-200-10).
PAPER_LAYERS = {"add": 1, "sub": 2, "mul": 1, "div": 2, "sq": 1, "quad": 1, "digits": 2}
DIGITS_IMAGES, DIGITS_TRAIN = 1797, 1000
TASKS = (*OPERATIONS, "digits")


def _inverse(b: torch.Tensor, p: int) -> torch.Tensor:
    """Modular inverse b^(p-2) mod p (Fermat; p prime, b != 0)."""
    return torch.tensor([pow(int(x), p - 2, p) for x in b.flatten().tolist()], dtype=torch.int64).reshape(b.shape)


def is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


@dataclass
class TaskConfig:
    task: str = "add"  # one of TASKS
    p: int = 113  # the paper's modulus
    frac: float | None = None  # train fraction; None -> the paper's value (digits: 1,000 images)
    seed: int = 0  # seeds the permutation that splits train and test

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose from {', '.join(TASKS)}")
        if self.p < 3:
            raise ValueError(f"modulus p must be at least 3, got {self.p}")
        if self.task == "div" and not is_prime(self.p):
            raise ValueError(f"division needs a prime modulus, got p={self.p}")
        if self.frac is None:
            self.frac = DIGITS_TRAIN / DIGITS_IMAGES if self.task == "digits" else OPERATIONS[self.task][1]
        if not 0.0 < self.frac < 1.0:
            raise ValueError(f"train fraction must lie in (0, 1), got {self.frac}")

    @property
    def vocab(self) -> int:
        return self.p + 2

    @property
    def classes(self) -> int:
        return 10 if self.task == "digits" else self.p + 2


def n_train_of(frac: float, n: int, task: str) -> int:
    """floor(frac * n) as the paper; digits round, so that the default gives exactly 1,000."""
    return round(frac * n) if task == "digits" else math.floor(frac * n)


@dataclass
class Dataset:
    """All examples of a task, split once: inputs (N, 4) int64 tokens (digits: (N, 64) float
    pixels) and targets (N,) int64; `loss` names the objective they are fit with (objective.py)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    config: TaskConfig = field(repr=False)
    loss: str = "ce"


def make_dataset(cfg: TaskConfig) -> Dataset:
    """All p*p pairs (division: b != 0), or all digits, one seeded permutation, the first
    n_train_of(frac, N) train."""
    if cfg.task == "digits":
        x, c = digits()
        return split(x, c, cfg)
    p = cfg.p
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    if cfg.task == "div":
        a, b = a[b != 0], b[b != 0]
    c = OPERATIONS[cfg.task][0](a, b, p)
    x = torch.stack([a, torch.full_like(a, p), b, torch.full_like(a, p + 1)], dim=1)
    return split(x, c, cfg)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits: pixels / 16 as float32 (N, 64), labels (N,) int64."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data / 16.0, dtype=torch.float32), torch.tensor(data.target, dtype=torch.int64)


def split(x: torch.Tensor, c: torch.Tensor, cfg: TaskConfig) -> Dataset:
    """One seeded permutation of all examples, the first n_train_of(frac, N) train."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
    n_train = n_train_of(cfg.frac, len(x), cfg.task)
    if n_train < 1 or n_train >= len(x):
        raise ValueError(f"train fraction {cfg.frac} leaves an empty train or test set for {cfg.task} (p={cfg.p})")
    tr, te = perm[:n_train], perm[n_train:]
    return Dataset(x[tr], c[tr], x[te], c[te], cfg)


def paper_batch_size(n_train: int) -> int:
    """The paper's minibatch: min(512, N_train // 2), at least 1."""
    return max(1, min(512, n_train // 2))


def epoch_batches(n: int, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Index batches of one epoch: a fresh permutation, the remainder batch kept."""
    return list(torch.randperm(n, generator=generator).split(batch))
