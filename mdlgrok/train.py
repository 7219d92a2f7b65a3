"""The training loop: AdamW plus the paper's regularizers, log-spaced evaluation and
checkpoints, exact resume.

    from mdlgrok.train import TrainConfig, train
    train(TrainConfig(task="add", preset="ours", epochs=600), "runs/add")
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch
from torch.nn import functional as F

from mdlgrok.models import ModelConfig, build_model
from mdlgrok.regularizers import (RegConfig, WeightNoise, effective_ranks, mean_spectral_entropy,
                                  preset as reg_preset)
from mdlgrok.results import (RunDir, RunExistsError, environment, load_checkpoint, row, rows_to_frame,
                             save_checkpoint, write_json, write_table)
from mdlgrok.tasks import PAPER_LAYERS, TaskConfig, epoch_batches, make_dataset, paper_batch_size

PAPER_EPS = (4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625)  # tolerances in nats
LOG_PROB_FLOOR = math.log(1e-9)  # the paper clips probabilities at 1e-9


@dataclass
class TrainConfig:
    """A run's resolved configuration; None fields take the paper's value for the task."""

    task: str = "add"
    p: int = 113
    frac: float | None = None  # paper: add 0.2, sub 0.3, mul 0.2, div 0.3, sq 0.4, quad 0.6
    model: str = "transformer"
    layers: int | None = None  # paper: 2 blocks for sub/div, 1 otherwise
    attention: str = "paper"  # the paper's sum-of-values attention; "softmax" is standard
    pos_rows: int | None = None  # None -> p+2 rows as the paper; 4 is enough
    preset: str = "ours"  # none | wd | ours; explicit wd/gamma/sigma override it
    wd: float | None = None
    gamma: float | None = None
    sigma: float | None = None
    noise: str = "gaussian"  # gaussian (paper, sigma is a std) | uniform (sigma is a bin)
    lr: float = 1e-3  # paper's AdamW
    betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-8
    batch: int | None = None  # None -> min(512, N_train // 2); 0 -> full batch
    epochs: int = 10_000  # the paper's length (its "steps" are epochs)
    seed: int = 0
    measure: bool = False  # measure complexity at every checkpoint as the run goes
    eps: tuple[float, ...] = field(default=PAPER_EPS)

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.eps = tuple(float(e) for e in self.eps)
        task = TaskConfig(self.task, self.p, self.frac, self.seed)  # validates task, p, frac
        self.frac = task.frac
        if self.layers is None:
            self.layers = PAPER_LAYERS[self.task]
        base = reg_preset(self.preset, self.task)
        self.wd = base.wd if self.wd is None else self.wd
        self.gamma = base.gamma if self.gamma is None else self.gamma
        self.sigma = base.sigma if self.sigma is None else self.sigma
        self.reg_config()  # validates the regularizer weights
        self.model_config()
        if self.lr <= 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch is not None and self.batch < 0:
            raise ValueError(f"batch must be non-negative (0 = full batch), got {self.batch}")
        if any(not (e > 0 and math.isfinite(e)) for e in self.eps):
            raise ValueError(f"every eps must be a positive finite number of nats, got {list(self.eps)}")

    def task_config(self) -> TaskConfig:
        return TaskConfig(self.task, self.p, self.frac, self.seed)

    def model_config(self) -> ModelConfig:
        return ModelConfig(vocab=self.p + 2, model=self.model, layers=self.layers,
                           attention=self.attention, pos_rows=self.pos_rows)

    def reg_config(self) -> RegConfig:
        return RegConfig(wd=self.wd, gamma=self.gamma, sigma=self.sigma, noise=self.noise)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class TrainingFailed(RuntimeError):
    """The loss became NaN or infinite; the run is marked failed and keeps its rows."""


def log_epochs(epochs: int) -> list[int]:
    """The paper's evaluation epochs: distinct int(1.3^n) up to `epochs`, plus the last epoch."""
    points, n = set(), 0
    while int(1.3**n) <= epochs:
        points.add(int(1.3**n))
        n += 1
    return sorted(points | {epochs})


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean -ln p(y|x) in nats, probabilities clipped at 1e-9 as the paper."""
    logp = F.log_softmax(logits.float(), dim=-1).gather(1, y[:, None]).squeeze(1)
    return -logp.clamp_min(LOG_PROB_FLOOR).mean()


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 16384) -> tuple[float, float]:
    """Full-set (mean loss in nats, accuracy), batched, without autograd."""
    loss_sum, correct = 0.0, 0
    for xs, ys in zip(x.split(chunk), y.split(chunk)):
        logits = model(xs)
        loss_sum += float(cross_entropy(logits, ys)) * len(ys)
        correct += int((logits.argmax(-1) == ys).sum())
    return loss_sum / len(y), correct / len(y)


def model_metrics(model: torch.nn.Module, data) -> dict[str, float]:
    """The metrics recorded at every evaluation epoch."""
    train_loss, train_acc = evaluate(model, data.x_train, data.y_train)
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
    with torch.no_grad():
        norm = math.sqrt(sum(float(p.pow(2).sum()) for p in model.parameters()))
        entropy = float(mean_spectral_entropy(model))
    ranks = effective_ranks(model)
    return {"train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss, "test_acc": test_acc,
            "weight_norm": norm, "spectral_entropy": entropy, "effective_rank": sum(ranks) / len(ranks)}


class Progress:
    """A tqdm bar on a terminal, one plain line per evaluation otherwise."""

    def __init__(self, total: int, start: int, enabled: bool = True):
        self.enabled, self.tty = enabled, sys.stderr.isatty()
        self.bar = None
        if enabled and self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="epoch", file=sys.stderr)

    def epoch(self) -> None:
        if self.bar:
            self.bar.update(1)

    def report(self, epoch: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        text = " ".join(f"{k}={metrics[k]:.4g}" for k in ("train_loss", "train_acc", "test_loss", "test_acc"))
        if self.bar:
            self.bar.set_postfix_str(text)
        else:
            print(f"epoch {epoch}: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


class Trainer:
    """One run: model, optimizer, data, generators and the rows recorded so far."""

    def __init__(self, cfg: TrainConfig, run: RunDir):
        self.cfg, self.run = cfg, run
        self.data = make_dataset(cfg.task_config())
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model_config())
        reg = cfg.reg_config()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps,
                                     weight_decay=reg.wd)
        self.shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.noise_gen = torch.Generator().manual_seed(cfg.seed + 2)
        self.noise = WeightNoise(list(self.model.parameters()), reg.sigma, reg.noise, self.noise_gen) if reg.sigma else None
        n = len(self.data.y_train)
        self.batch = n if cfg.batch == 0 else (cfg.batch or paper_batch_size(n))
        self.epoch, self.step, self.rows = 0, 0, []

    def train_epoch(self) -> float:
        """One pass over shuffled minibatches; returns the sum of the batch losses."""
        self.model.train()
        total = torch.zeros(())
        for idx in epoch_batches(len(self.data.y_train), self.batch, self.shuffle_gen):
            if self.noise:
                self.noise.add()
            loss = cross_entropy(self.model(self.data.x_train[idx]), self.data.y_train[idx])
            if self.cfg.gamma:
                # "gamma * mean over all matrices of H(W)"
                loss = loss + self.cfg.gamma * mean_spectral_entropy(self.model)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            for p in self.model.parameters():  # no gradient still means weight decay, as in optax
                if p.grad is None:  # (the paper attention's query and key without the penalty)
                    p.grad = torch.zeros_like(p)
            if self.noise:
                self.noise.remove()  # the gradient was taken at the noisy point; update the clean one
            self.opt.step()
            total += loss.detach()
            self.step += 1
        self.epoch += 1
        return float(total)

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "rng": {"shuffle": self.shuffle_gen.get_state(), "noise": self.noise_gen.get_state()},
                "epoch": self.epoch, "step": self.step, "config": json.dumps(self.cfg.to_dict())}

    def load_state(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.shuffle_gen.set_state(ckpt["rng"]["shuffle"])
        self.noise_gen.set_state(ckpt["rng"]["noise"])
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])

    def record(self, metrics: dict[str, float]) -> None:
        self.rows += [row(self.run.run_id, self.epoch, self.step, k, v) for k, v in metrics.items()]

    def flush(self) -> None:
        write_table(self.run.metrics, rows_to_frame(self.rows))


def start_run(cfg: TrainConfig, run: RunDir, resume: bool) -> Trainer:
    """A fresh trainer, or one restored from the run's last checkpoint."""
    if run.exists() and not resume:
        raise RunExistsError(f"{run.path} already holds a run; pass --resume to continue it or choose another --out")
    ckpt, rows = resume_point(cfg, run) if resume else (None, [])
    trainer = Trainer(cfg, run)
    if ckpt is not None:
        trainer.load_state(ckpt)
        trainer.rows = rows
    write_json(run.config, cfg.to_dict())
    write_json(run.env, environment())
    return trainer


def resume_point(cfg: TrainConfig, run: RunDir) -> tuple[dict | None, list[dict]]:
    """What resuming `run` with `cfg` starts from: its last checkpoint (None: nothing to resume)
    and the metric rows recorded up to it. Refuses a folder started with another config."""
    if run.config.exists():
        try:
            saved = TrainConfig.from_dict(json.loads(run.config.read_text()))
        except (ValueError, TypeError, AttributeError) as exc:  # truncated, not JSON, or not a config
            raise ValueError(f"--resume: cannot read {run.config} ({exc})") from None
        check_resumable(saved, cfg, run)
    checkpoints = run.checkpoints()
    if not checkpoints:
        return None, []
    ckpt = load_checkpoint(checkpoints[-1])
    kept = run.read_metrics()
    return ckpt, kept[kept.epoch <= int(ckpt["epoch"])].to_dict("records")


def check_resumable(saved: TrainConfig, cfg: TrainConfig, run: RunDir) -> None:
    """A run resumes with the config it started with; only `epochs` may grow."""
    diff = sorted(k for k, v in cfg.to_dict().items() if saved.to_dict()[k] != v and k != "epochs")
    if diff:
        raise ValueError(f"--resume: {run.path} was started with a different config ({', '.join(diff)})")


def train(cfg: TrainConfig, out: str, resume: bool = False, progress: bool = True, measure_fn=None) -> Trainer:
    """Train (or resume) a run into `out`; returns the trainer with its rows.

    measure_fn(trainer) -> rows, when given, is called after each checkpoint is written
    (the complexity stage; never part of logging).
    """
    run = RunDir(out)
    trainer = start_run(cfg, run, resume)
    cfg = trainer.cfg
    schedule = [e for e in log_epochs(cfg.epochs) if e > trainer.epoch]
    run.set_status("running", epoch=trainer.epoch)
    bar = Progress(cfg.epochs, trainer.epoch, progress)
    start = time.perf_counter()
    try:
        while trainer.epoch < cfg.epochs:
            loss_sum = trainer.train_epoch()
            bar.epoch()
            if not math.isfinite(loss_sum):
                reason = f"loss became {loss_sum} at epoch {trainer.epoch}"
                run.set_status("failed", reason=reason, epoch=trainer.epoch)
                raise TrainingFailed(f"{run.path}: {reason}; kept the rows recorded before it")
            if schedule and trainer.epoch == schedule[0]:
                schedule.pop(0)
                checkpoint(trainer, bar, measure_fn)
    finally:
        bar.close()
    run.set_status("complete", epoch=trainer.epoch, wall_s=round(time.perf_counter() - start, 3))
    return trainer


def checkpoint(trainer: Trainer, bar: Progress, measure_fn=None) -> None:
    """Evaluate, write the rows, then the checkpoint (rows first: resume drops rows past it)."""
    metrics = model_metrics(trainer.model, trainer.data)
    trainer.record(metrics)
    bar.report(trainer.epoch, metrics)
    if measure_fn is not None:
        trainer.rows += measure_fn(trainer)
    trainer.flush()
    save_checkpoint(trainer.run.checkpoint_path(trainer.epoch), trainer.state())
