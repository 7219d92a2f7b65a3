"""The complexity stage: measure checkpoints of a run into tidy rows.

    mdlgrok measure runs/add --jobs 2          # every checkpoint, in parallel processes
    mdlgrok complexity runs/add/checkpoints/epoch_000417.pt --eps 0.5

Rows (metric names of DESIGN.md): complexity_bits (codec = the winning codec),
codec_bits (one row per codec), naive_bits, compression_ratio, coarse_train_loss,
coarse_test_loss, coarse_train_acc, coarse_test_acc, data_bits, description_bits,
loss_evals, estimator_seconds; all with eps set and `estimator` naming the search.
Payloads are written beside the checkpoints so every figure can be decoded again.
"""

from __future__ import annotations

import json
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import torch

from mdlgrok.complexity import estimate
from mdlgrok.complexity.codecs import codec_versions
from mdlgrok.results import (CheckpointError, RunDir, atomic_write, load_checkpoint, row, rows_to_frame,
                             write_json, write_table)
from mdlgrok.train import TrainConfig, evaluate

LN2 = math.log(2)


def closures(data):
    """loss_fn (mean train loss, nats) and eval_fn (the other coarse metrics) for a dataset."""
    def loss_fn(model):
        return evaluate(model, data.x_train, data.y_train)[0]

    def eval_fn(model):
        train_loss, train_acc = evaluate(model, data.x_train, data.y_train)
        test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
        return {"coarse_train_acc": train_acc, "coarse_test_loss": test_loss, "coarse_test_acc": test_acc}

    return loss_fn, eval_fn


def result_rows(results, run_id: str, epoch: int, step: int, n_train: int) -> list[dict]:
    """Tidy rows of one checkpoint's estimates."""
    rows = []
    for r in results:
        data_bits = r.coarse_loss * n_train / LN2  # sum_i -log2 p(y_i | x_i) under the coarse model
        values = {"complexity_bits": r.bits, "naive_bits": r.naive_bits, "compression_ratio": r.ratio,
                  "coarse_train_loss": r.coarse_loss, "data_bits": data_bits, "description_bits": r.bits + data_bits,
                  "loss_evals": r.loss_evals, "estimator_seconds": r.seconds, **r.extra}
        for metric, value in values.items():
            codec = r.codec if metric == "complexity_bits" else ""
            rows.append(row(run_id, epoch, step, metric, value, r.eps, codec, r.mode))
        for codec, bits in r.codec_bits.items():
            rows.append(row(run_id, epoch, step, "codec_bits", bits, r.eps, codec, r.mode))
    return rows


def measure_model(model, data, eps, run_id: str, epoch: int, step: int, mode: str = "mdlgrok"):
    """Estimate one model; returns (results, rows)."""
    loss_fn, eval_fn = closures(data)
    results = estimate(model, loss_fn, eps, eval_fn=eval_fn, mode=mode)
    return results, result_rows(results, run_id, epoch, step, len(data.y_train))


def save_payloads(results, ckpt_path: Path, epoch: int) -> None:
    """Payloads and the choices made, beside the checkpoint (payloads/epoch_E_eps_X.<mode>.bin)."""
    folder = ckpt_path.parent.parent / "payloads"
    info = []
    for r in results:
        name = f"epoch_{epoch:06d}_eps_{r.eps:g}.{r.mode}.bin"
        atomic_write(folder / name, lambda tmp, p=r.payload: tmp.write_bytes(p))
        info.append({"eps": r.eps, "mode": r.mode, "file": name, "bits": r.bits, "codec": r.codec,
                     "codec_bits": r.codec_bits, "choices": r.choices, "coarse_loss": r.coarse_loss,
                     "base_loss": r.base_loss})
    write_json(folder / f"epoch_{epoch:06d}.{results[0].mode}.json", {"codecs": codec_versions(), "results": info})


def measure_trainer(trainer, eps) -> list[dict]:
    """The --measure hook of `mdlgrok train`: the model at this checkpoint, all eps."""
    results, rows = measure_model(trainer.model, trainer.data, eps, trainer.run.run_id, trainer.epoch, trainer.step)
    save_payloads(results, trainer.run.checkpoint_path(trainer.epoch), trainer.epoch)
    return rows


def model_from_checkpoint(path: str | Path):
    """(model, data, epoch, step) from an mdlgrok checkpoint, loaded without executing code."""
    from mdlgrok.models import build_model
    from mdlgrok.tasks import make_dataset

    ckpt = load_checkpoint(path)
    if "config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not an mdlgrok training checkpoint (no config); "
                              "use mdlgrok.complexity.estimate on your own module")
    cfg = TrainConfig.from_dict(json.loads(ckpt["config"]))
    model = build_model(cfg.model_config())
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not match its config: {str(exc).splitlines()[0]}") from None
    return model, make_dataset(cfg.task_config()), int(ckpt.get("epoch", 0)), int(ckpt.get("step", 0))


def measure_checkpoint(path: str, eps, mode: str = "mdlgrok", threads: int | None = None) -> list[dict]:
    """Rows of one checkpoint file (run in a worker process by measure_run)."""
    if threads:
        torch.set_num_threads(threads)
    model, data, epoch, step = model_from_checkpoint(path)
    results, rows = measure_model(model, data, eps, RunDir(Path(path).parent.parent).run_id, epoch, step, mode)
    save_payloads(results, Path(path), epoch)
    return rows


def measure_run(run_path: str, eps, jobs: int = 1, mode: str = "mdlgrok", progress: bool = True) -> pd.DataFrame:
    """Measure every checkpoint of a run; the rows replace earlier ones of the same estimator in metrics.parquet."""
    run = RunDir(run_path)
    checkpoints = run.checkpoints()
    if not checkpoints:
        raise FileNotFoundError(f"{run_path} holds no checkpoints")
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    rows: list[dict] = []
    if jobs == 1:
        for i, path in enumerate(checkpoints):
            rows += measure_checkpoint(str(path), eps, mode)  # in-process: keep the caller's thread setting
            _progress(progress, i + 1, len(checkpoints), path)
    else:
        with ProcessPoolExecutor(jobs, mp_context=torch.multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(measure_checkpoint, str(p), eps, mode, threads) for p in checkpoints]
            for i, (path, fut) in enumerate(zip(checkpoints, futures)):
                rows += fut.result()
                _progress(progress, i + 1, len(checkpoints), path)
    new = rows_to_frame(rows)
    old = run.read_metrics()
    table = rows_to_frame(old[old.estimator != mode].to_dict("records") + rows)
    write_table(run.metrics, table)
    return new


def _progress(enabled: bool, done: int, total: int, path: Path) -> None:
    if enabled:
        print(f"measured {done}/{total}: {path.name}", file=sys.stderr, flush=True)


def checkpoint_report(path: str, eps, mode: str = "mdlgrok") -> str:
    """A readable report of one checkpoint's complexity."""
    model, data, epoch, _ = model_from_checkpoint(path)
    loss_fn, eval_fn = closures(data)
    results = estimate(model, loss_fn, eps, eval_fn=eval_fn, mode=mode)
    r0 = results[0]
    lines = [f"{path}: epoch {epoch}, {sum(p.numel() for p in model.parameters()):,} parameters, "
             f"train loss {r0.base_loss:.4g} nats, estimator {mode} ({r0.loss_evals} loss calls, {r0.seconds:.1f} s)",
             f"naive size (bzip2 of float32 weights): {r0.naive_bits // 8:,} bytes",
             f"{'eps':>8} {'bytes':>9} {'codec':>10} {'ratio':>7} {'coarse loss':>12} {'test acc':>9}"]
    for r in results:
        lines.append(f"{r.eps:8.4g} {r.bits // 8:9,} {r.codec:>10} {r.ratio:7.1f} {r.coarse_loss:12.4g} "
                     f"{r.extra.get('coarse_test_acc', float('nan')):9.3f}")
    if mode == "mdlgrok":
        lines.append(f"choices at eps {results[-1].eps:g}: " + ", ".join(
            f"{c['name']}={c['kind']}" + (f"(k={c['rank']})" if c["kind"] == "lowrank" else "")
            + (f"[{c['rows']} rows read]" if c.get("rows") else "")
            + (f"[Fourier {c['fourier']}]" if c.get("fourier") else "") for c in results[-1].choices if c["kind"] != "raw"))
    return "\n".join(lines)
