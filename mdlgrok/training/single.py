"""The single-model engine: one model, torch's AdamW, the paper's regularizers.

An engine knows one optimizer step and its state; the loop (training/loop.py) owns the
schedule, the rows, the checkpoints, status and resume. Engines share one interface:
n, epoch, step, train_epoch() -> per-model loss sums, metrics(), model(i), data(i),
state(i), load_state(i, ckpt), freeze(i), and the `grad_hook` called between backward and
the optimizer step.
"""

from __future__ import annotations

import json

import torch

from mdlgrok.config import TrainConfig
from mdlgrok.regularizers import EmaGradFilter, WeightNoise, mean_spectral_entropy
from mdlgrok.tasks import epoch_batches, paper_batch_size
from mdlgrok.training.objective import model_metrics, task_loss
from mdlgrok.training.start import initial_model, training_data


def batch_size(cfg: TrainConfig, n_train: int) -> int:
    """The minibatch: the config's, full batch for 0, else the paper's min(512, N // 2)."""
    return n_train if cfg.batch == 0 else (cfg.batch or paper_batch_size(n_train))


class SingleEngine:
    """One run: model, optimizer, data and generators (shuffle: seed + 1, noise: seed + 2)."""

    n = 1

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.configs = [cfg]
        self._data = training_data(cfg)
        self._model = initial_model(cfg)
        reg = cfg.reg_config()
        self.opt = torch.optim.AdamW(
            self._model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, weight_decay=reg.wd
        )
        self.shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.noise_gen = torch.Generator().manual_seed(cfg.seed + 2)
        params = list(self._model.parameters())
        self.noise = WeightNoise(params, reg.sigma, reg.noise, self.noise_gen) if reg.sigma else None
        self.batch = batch_size(cfg, len(self._data.y_train))
        self.grad_filter = EmaGradFilter(cfg.grad_alpha, cfg.grad_lambda) if cfg.grad_filter == "ema" else None
        self.epoch, self.step = 0, 0
        self.grad_hook = None  # grad_hook(engine): after backward, before the optimizer step

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        """Training loss on minibatch idx: the task loss plus "gamma * mean over all matrices of H(W)"."""
        loss = task_loss(self._model(self._data.x_train[idx]), self._data.y_train[idx], self._data.loss)
        if self.cfg.gamma:
            loss = loss + self.cfg.gamma * mean_spectral_entropy(self._model)
        return loss

    def train_step(self, idx: torch.Tensor) -> torch.Tensor:
        if self.noise:
            self.noise.add()
        loss = self.loss(idx)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in self._model.parameters():  # no gradient still means weight decay, as in optax
            if p.grad is None:  # (the paper attention's query and key without the penalty)
                p.grad = torch.zeros_like(p)
        if self.noise:
            self.noise.remove()  # the gradient was taken at the noisy point; update the clean one
        if self.grad_filter:
            self.grad_filter({n: p.grad for n, p in self._model.named_parameters()})
        if self.grad_hook:
            self.grad_hook(self)
        self.opt.step()
        self.step += 1
        return loss.detach()

    def train_epoch(self) -> list[float]:
        """One pass over shuffled minibatches; [the sum of the batch losses]."""
        self._model.train()
        total = torch.zeros(())
        for idx in epoch_batches(len(self._data.y_train), self.batch, self.shuffle_gen):
            total += self.train_step(idx)
        self.epoch += 1
        return [float(total)]

    def metrics(self) -> list[dict[str, float]]:
        return [model_metrics(self._model, self._data)]

    def model(self, i: int = 0) -> torch.nn.Module:
        return self._model

    def data(self, i: int = 0):
        return self._data

    def freeze(self, i: int) -> None:
        """A diverged model: the loop stops (a single engine has no other model to go on with)."""

    def state(self, i: int = 0) -> dict:
        state = {
            "model": self._model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "rng": {"shuffle": self.shuffle_gen.get_state(), "noise": self.noise_gen.get_state()},
            "epoch": self.epoch,
            "step": self.step,
            "config": json.dumps(self.cfg.to_dict()),
        }
        if self.grad_filter and self.grad_filter.mu is not None:
            state["grad_filter"] = self.grad_filter.mu
        return state

    def load_state(self, i: int, ckpt: dict) -> None:
        self._model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.shuffle_gen.set_state(ckpt["rng"]["shuffle"])
        self.noise_gen.set_state(ckpt["rng"]["noise"])
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        if self.grad_filter and ckpt.get("grad_filter") is not None:
            self.grad_filter.mu = {k: v.clone() for k, v in ckpt["grad_filter"].items()}
