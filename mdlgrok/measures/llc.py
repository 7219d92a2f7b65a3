"""The local learning coefficient (LLC) of a checkpoint by SGLD (Lau et al. 2023, arXiv 2308.12108).

Around the checkpoint w*, each chain draws

    w <- w - (lr / 2) (n_beta * grad L_B(w) + gamma (w - w*)) + sqrt(lr) N(0, I)

with L_B the mean loss (nats) of a fresh minibatch B, and estimates

    LLC = n_beta * (mean over draws after burn-in of L_B(w_t) - L(w*)),

L(w*) the mean loss over the whole training set. n_beta defaults to B / ln B (B the batch
size), as devinterp. This is devinterp 1.3.2's SGLD step and LLC estimator (no weight decay,
no temperature), written for one model here; its init loss is the full training loss.
Reported per checkpoint: llc (mean over chains) and llc_std (their standard deviation).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from mdlgrok.training.objective import evaluate, task_loss

NAME, VERSION = "llc", "1"


@dataclass
class SGLD:
    """Options of the sampler (defaults chosen on the paper transformer: stable chains, ~3 s per checkpoint)."""

    lr: float = 1e-4  # step size
    gamma: float = 100.0  # localization strength
    nbeta: float | None = None  # inverse temperature; None: B / ln B
    chains: int = 2  # independent chains; their spread is reported
    draws: int = 100  # draws per chain after burn-in
    burnin: int = 20  # steps per chain before the draws
    batch: int = 512  # minibatch size B (at most the training set)
    seed: int = 0


def default_nbeta(batch: int) -> float:
    return batch / math.log(batch) if batch > 1 else 1.0


def sgld_llc(
    model: torch.nn.Module,
    batch_loss: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    init_loss: float,
    n: int,
    opts: SGLD,
) -> list[float]:
    """One LLC estimate per chain. batch_loss(module, idx) -> mean loss (nats) on training examples idx of n."""
    batch = min(opts.batch, n)
    nbeta = opts.nbeta or default_nbeta(batch)
    gen = torch.Generator().manual_seed(opts.seed)
    center = [p.detach().clone() for p in model.parameters()]
    sampler = copy.deepcopy(model)
    params = list(sampler.parameters())
    out = []
    for _ in range(opts.chains):
        with torch.no_grad():
            for p, c in zip(params, center):
                p.copy_(c)
        losses = []
        for t in range(opts.burnin + opts.draws):
            idx = torch.randperm(n, generator=gen)[:batch]
            loss = batch_loss(sampler, idx)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            sgld_step(params, grads, center, opts.lr, nbeta, opts.gamma, gen)
            if t >= opts.burnin:
                losses.append(float(loss.detach()))
        out.append(nbeta * (sum(losses) / len(losses) - init_loss))
    return out


@torch.no_grad()
def sgld_step(params, grads, center, lr: float, nbeta: float, gamma: float, gen: torch.Generator) -> None:
    """w <- w - (lr / 2) (nbeta * g + gamma (w - w*)) + sqrt(lr) N(0, I), every parameter."""
    for p, g, c in zip(params, grads, center):
        drift = (g * nbeta if g is not None else torch.zeros_like(p)) + gamma * (p - c)
        noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        p.add_(drift, alpha=-0.5 * lr).add_(noise, alpha=lr**0.5)


def options_of(cfg) -> SGLD:
    return SGLD(**{k.removeprefix("llc_"): v for k, v in cfg.to_dict().items() if k.startswith("llc_")})


def expected(cfg) -> set[tuple]:
    return {(NAME, VERSION, json.dumps(asdict(options_of(cfg)), sort_keys=True), None)}


def measure(model, data, cfg, payloads=None, epoch: int = 0) -> list[dict]:
    opts = options_of(cfg)
    x, y = data.x_train, data.y_train
    kind = getattr(data, "loss", "ce")
    init = evaluate(model, x, y, loss=kind)[0]
    chains = sgld_llc(model, lambda m, idx: task_loss(m(x[idx]), y[idx], kind), init, len(y), opts)
    mean = sum(chains) / len(chains)
    std = (sum((c - mean) ** 2 for c in chains) / (len(chains) - 1)) ** 0.5 if len(chains) > 1 else math.nan
    tag = {"estimator": NAME, "estimator_version": VERSION, "options": json.dumps(asdict(opts), sort_keys=True)}
    return [{"metric": "llc", "value": mean, **tag}, {"metric": "llc_std", "value": std, **tag}]
