"""Complexity of a checkpoint at every eps (mdlgrok.complexity), with its payloads saved.

Rows (bits unless said): complexity_bits (codec = the winning codec), codec_bits (one row
per codec), naive_bits, compression_ratio, coarse_train_loss and coarse_test_loss (nats),
coarse_train_acc, coarse_test_acc, data_bits (sum_i -log2 p(y_i|x_i) over the training set
under the coarse model; for squared-error runs the Gaussian likelihood of docs/measures.md),
description_bits (model + data), loss_evals, estimator_seconds.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch

from mdlgrok.complexity import VERSION, estimate, paper_estimate
from mdlgrok.complexity.codecs import codec_versions
from mdlgrok.runs import atomic_write, write_json
from mdlgrok.training.objective import evaluate

LN2 = math.log(2)
# The options each estimator runs with here (estimate's and paper_estimate's defaults), as recorded in every row.
OPTIONS = {
    "mdlgrok": {"lowrank": True, "polish": True, "data_aware": True, "seed": 0},
    "paper": {"seed": 0, "constraint": "full training set"},
}


def options_of(cfg) -> str:
    return json.dumps(OPTIONS[cfg.estimator], sort_keys=True)


def expected(cfg) -> set[tuple]:
    return {(cfg.estimator, VERSION, options_of(cfg), float(e)) for e in cfg.eps}


def closures(data):
    """loss_fn (mean train loss of the run's objective, nats) and eval_fn (the other coarse
    metrics) for a dataset."""
    kind = getattr(data, "loss", "ce")

    def loss_fn(model):
        return evaluate(model, data.x_train, data.y_train, loss=kind)[0]

    def eval_fn(model):
        train_loss, train_acc = evaluate(model, data.x_train, data.y_train, loss=kind)
        test_loss, test_acc = evaluate(model, data.x_test, data.y_test, loss=kind)
        return {"coarse_train_acc": train_acc, "coarse_test_loss": test_loss, "coarse_test_acc": test_acc}

    return loss_fn, eval_fn


def run_estimator(model: torch.nn.Module, data, cfg):
    """The Results of cfg.estimator on one model, all of cfg.eps."""
    if getattr(data, "loss", "ce") == "mse" and max(cfg.eps) >= 0.5:
        warnings.warn(
            "squared error: at eps >= 0.5 nats the all-zero network (0.5 nats) qualifies; measure "
            "such runs at smaller eps, e.g. --eps 0.05 0.01",
            stacklevel=2,
        )
    loss_fn, eval_fn = closures(data)
    search = estimate if cfg.estimator == "mdlgrok" else paper_estimate
    return search(
        model,
        loss_fn,
        list(cfg.eps),
        eval_fn=eval_fn,
        **{k: v for k, v in OPTIONS[cfg.estimator].items() if k in ("lowrank", "polish", "data_aware", "seed")},
    )


def accuracy_result(model: torch.nn.Module, data, drop: float):
    """mdlgrok's estimate under the accuracy constraint alone: the shortest description whose
    training accuracy stays within `drop` of the original's (eps = inf: no loss limit)."""
    loss_fn, eval_fn = closures(data)
    kind = getattr(data, "loss", "ce")

    def accuracy_fn(m):
        return evaluate(m, data.x_train, data.y_train, loss=kind)[1]

    options = {k: v for k, v in OPTIONS["mdlgrok"].items()}
    (result,) = estimate(
        model, loss_fn, [math.inf], eval_fn=eval_fn, accuracy_fn=accuracy_fn, accuracy_drop=drop, **options
    )
    return result


def result_rows(results, n_train: int, cfg) -> list[dict]:
    """Tidy rows of one checkpoint's estimates."""
    tag = {"estimator": cfg.estimator, "estimator_version": VERSION, "options": options_of(cfg)}
    rows = []
    for r in results:
        data_bits = r.coarse_loss * n_train / LN2  # sum_i -log2 p(y_i | x_i) under the coarse model
        values = {
            "complexity_bits": r.bits,
            "naive_bits": r.naive_bits,
            "compression_ratio": r.ratio,
            "coarse_train_loss": r.coarse_loss,
            "data_bits": data_bits,
            "description_bits": r.bits + data_bits,
            "loss_evals": r.loss_evals,
            "estimator_seconds": r.seconds,
            **r.extra,
        }
        rows += [
            {"metric": m, "value": v, "eps": r.eps, "codec": r.codec if m == "complexity_bits" else "", **tag}
            for m, v in values.items()
        ]
        rows += [
            {"metric": "codec_bits", "value": bits, "eps": r.eps, "codec": codec, **tag}
            for codec, bits in r.codec_bits.items()
        ]
    return rows


def save_payloads(results, folder: Path, epoch: int, estimator: str) -> None:
    """Payloads and the choices made (payloads/epoch_E_eps_X.<estimator>.bin and epoch_E.<estimator>.json)."""
    info = []
    for r in results:
        name = f"epoch_{epoch:06d}_eps_{r.eps:g}.{estimator}.bin"
        atomic_write(folder / name, lambda tmp, p=r.payload: tmp.write_bytes(p))
        info.append(
            {
                "eps": r.eps,
                "estimator": estimator,
                "version": VERSION,
                "file": name,
                "bits": r.bits,
                "codec": r.codec,
                "codec_bits": r.codec_bits,
                "choices": r.choices,
                "coarse_loss": r.coarse_loss,
                "base_loss": r.base_loss,
                "norms": r.norms,
            }
        )
    write_json(folder / f"epoch_{epoch:06d}.{estimator}.json", {"codecs": codec_versions(), "results": info})


def measure(model, data, cfg, payloads: Path | None = None, epoch: int = 0) -> list[dict]:
    results = run_estimator(model, data, cfg)
    if payloads is not None:
        save_payloads(results, Path(payloads), epoch, cfg.estimator)
    return result_rows(results, len(data.y_train), cfg)
