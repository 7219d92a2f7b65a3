"""Shared helpers: tiny configurations that train in a fraction of a second."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_limits

from mdlgrok.config import TrainConfig

# One intra-op thread. With two OpenMP threads on a 2-core machine, torch.linalg.eigvalsh (the
# spectral penalty) intermittently stalls for seconds per call, turning a 2 s test into minutes;
# with one thread every run takes the same time. Subprocesses get the same setting via SINGLE_THREAD.
torch.set_num_threads(1)
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def tiny_config(**overrides) -> TrainConfig:
    """add mod 7 (9 train examples, batches 4 + 4 + 1), the paper's 1-block transformer, "ours"."""
    kw = dict(task="add", p=7, epochs=8, preset="ours", seed=0)
    kw.update(overrides)
    return TrainConfig(**kw)


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under folder (empty when it does not exist)."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


@pytest.fixture(scope="session", autouse=True)
def one_blas_thread():
    """numpy's BLAS with one thread, like torch here: oversubscribed BLAS threads on a busy
    2-core machine make the SVDs (and the paper mode's Gaussian process) several times slower."""
    with threadpool_limits(1):
        yield
