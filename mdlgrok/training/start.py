"""Where a run starts, for both engines: its data (the split, or a seeded subset of its training
examples) and its model (a fresh seeded init, or another run's weights)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mdlgrok.config import TrainConfig
from mdlgrok.models import build_model
from mdlgrok.runs import RunDir, config_of, load_checkpoint
from mdlgrok.tasks import Dataset, make_dataset

SPLIT_FIELDS = ("task", "p", "frac", "seed")  # what fixes the train/test split
ARCH_FIELDS = ("model", "layers", "width", "attention", "pos_rows")


def training_data(cfg: TrainConfig) -> Dataset:
    """The task's split, fit with cfg.loss (float inputs in cfg.dtype); with cfg.subset, the first
    `subset` of a seeded permutation (seed + 3) of its training examples (the test set stays the split's)."""
    data = make_dataset(cfg.task_config())
    x_train, y_train, x_test = data.x_train, data.y_train, data.x_test
    if x_train.is_floating_point():
        x_train, x_test = x_train.to(getattr(torch, cfg.dtype)), x_test.to(getattr(torch, cfg.dtype))
    if cfg.subset is not None:
        n = len(y_train)
        if cfg.subset > n:
            raise ValueError(f"subset {cfg.subset} is larger than the {n} training examples of the split")
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 3))[: cfg.subset].sort().values
        x_train, y_train = x_train[keep], y_train[keep]
    return Dataset(x_train, y_train, x_test, data.y_test, data.config, cfg.loss)


def initial_model(cfg: TrainConfig) -> torch.nn.Module:
    """torch.manual_seed(seed), then the model in cfg.dtype; with cfg.init_from, loaded with that
    run's weights."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model_config()).to(getattr(torch, cfg.dtype))
    if cfg.init_from:
        model.load_state_dict(init_checkpoint(cfg)["model"])
    return model


def init_checkpoint(cfg: TrainConfig) -> dict:
    """The checkpoint named by cfg.init_from (RUN or RUN:EPOCH), checked to share the split and
    the architecture, so that a subset is drawn from the examples that run trained on."""
    path, _, epoch = cfg.init_from.rpartition(":") if ":" in cfg.init_from else (cfg.init_from, "", "")
    run = RunDir(path)
    if not run.config.exists():
        raise FileNotFoundError(f"--init-from {cfg.init_from}: {path} is not a run folder")
    if epoch and not epoch.isdigit():
        raise ValueError(f"--init-from {cfg.init_from}: the epoch must be a whole number")
    ckpt_path = run.checkpoint_path(int(epoch)) if epoch else (run.checkpoints() or [Path("-")])[-1]
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"--init-from {cfg.init_from}: no checkpoint {ckpt_path}")
    base = config_of(json.loads(run.config.read_text()))
    differ = [f for f in (*SPLIT_FIELDS, *ARCH_FIELDS) if getattr(base, f) != getattr(cfg, f)]
    if differ:
        raise ValueError(
            f"--init-from {cfg.init_from}: that run has another split or architecture ({', '.join(differ)})"
        )
    return load_checkpoint(ckpt_path)
