"""What both training engines compute: the task loss (the clipped cross-entropy, or squared
error to one-hot targets) and the recorded metrics.

Every function here works on one model or, with a leading model axis, on a stack of them.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from mdlgrok.regularizers import effective_ranks, mean_spectral_entropy

LOG_PROB_FLOOR = math.log(1e-9)  # the paper clips probabilities at 1e-9


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean -ln p(y|x) in nats over the last batch axis, probabilities clipped at 1e-9 as the paper.
    (B, V) logits -> a scalar; (N, B, V) -> (N,), one per stacked model."""
    logp = F.log_softmax(_at_least_float32(logits), dim=-1).gather(-1, y[..., None]).squeeze(-1)
    return -logp.clamp_min(LOG_PROB_FLOOR).mean(-1)


def squared_error(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the last batch axis of 1/2 sum_k (f_k(x) - onehot(y)_k)^2: the negative
    log-likelihood, in nats, of a unit-variance Gaussian around the outputs, less its constant
    (K/2) ln(2 pi). It is K/2 times torch's MSELoss (Omnigrok's loss), which Adam does not see."""
    target = F.one_hot(y, outputs.shape[-1]).to(outputs.dtype)
    return 0.5 * (_at_least_float32(outputs) - target).pow(2).sum(-1).mean(-1)


LOSSES = {"ce": cross_entropy, "mse": squared_error}


def task_loss(outputs: torch.Tensor, y: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """The loss a run trains on (config.loss), in nats; shapes as cross_entropy."""
    return LOSSES[kind](outputs, y)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 16384, loss: str = "ce"
) -> tuple[float, float]:
    """Full-set (mean loss in nats, accuracy), batched, without autograd."""
    loss_sum, correct = 0.0, 0
    for xs, ys in zip(x.split(chunk), y.split(chunk)):
        logits = model(xs)
        loss_sum += float(task_loss(logits, ys, loss)) * len(ys)
        correct += int((logits.argmax(-1) == ys).sum())
    return loss_sum / len(y), correct / len(y)


def weight_norm(model: torch.nn.Module) -> float:
    """sqrt of the sum of squared parameters (Omnigrok's weight norm)."""
    with torch.no_grad():
        return math.sqrt(sum(float(p.pow(2).sum()) for p in model.parameters()))


def model_metrics(model: torch.nn.Module, data) -> dict[str, float]:
    """The metrics recorded at every evaluation epoch."""
    train_loss, train_acc = evaluate(model, data.x_train, data.y_train, loss=data.loss)
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test, loss=data.loss)
    with torch.no_grad():
        entropy = float(mean_spectral_entropy(model))
    ranks = [float(r) for r in effective_ranks(model)]
    return {
        "train_loss": train_loss,
        "train_acc": train_acc,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "weight_norm": weight_norm(model),
        "spectral_entropy": entropy,
        "effective_rank": sum(ranks) / len(ranks),
    }
