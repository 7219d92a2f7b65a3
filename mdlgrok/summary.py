"""A run's short summary: when it memorized and grokked, and what its complexity did."""

from __future__ import annotations

import math

import pandas as pd

from mdlgrok.results import RunDir


def first_epoch(table: pd.DataFrame, metric: str, threshold: float) -> int | None:
    """First recorded epoch where `metric` reaches `threshold` (None if never)."""
    hit = table[(table.metric == metric) & (table.value >= threshold)]
    return int(hit.epoch.min()) if len(hit) else None


def final(table: pd.DataFrame, metric: str) -> float:
    rows = table[table.metric == metric]
    return float(rows.loc[rows.epoch.idxmax(), "value"]) if len(rows) else math.nan


def complexity_summary(table: pd.DataFrame, eps: float = 0.5) -> dict | None:
    """Peak and final complexity (bytes) at eps, their epochs and ratios."""
    c = table[(table.metric == "complexity_bits") & (table.eps == eps) & (table.estimator == "mdlgrok")]
    if c.empty:
        return None
    c = c.sort_values("epoch")
    peak = c.loc[c.value.idxmax()]
    last = c.iloc[-1]
    naive = table[(table.metric == "naive_bits") & (table.epoch == last.epoch)].value
    return {"eps": eps, "peak_bytes": peak.value / 8, "peak_epoch": int(peak.epoch), "final_bytes": last.value / 8,
            "final_epoch": int(last.epoch), "peak_over_final": peak.value / last.value,
            "naive_over_final": float(naive.iloc[0]) / last.value if len(naive) else math.nan}


def summarize(run_path: str, plot: str | None = None) -> str:
    run = RunDir(run_path)
    table = run.read_metrics()
    if table.empty:
        raise FileNotFoundError(f"{run_path} holds no metrics.parquet")
    status = run.read_status()
    fmt = lambda e: "never" if e is None else str(e)  # noqa: E731
    lines = [f"run {run.path} ({status.get('state', 'unknown')}, {status.get('wall_s', '?')} s)",
             f"train accuracy 1.0 first at epoch {fmt(first_epoch(table, 'train_acc', 1.0))}; "
             f"test accuracy 0.95 first at epoch {fmt(first_epoch(table, 'test_acc', 0.95))}",
             f"final: train acc {final(table, 'train_acc'):.4f}, test acc {final(table, 'test_acc'):.4f}, "
             f"train loss {final(table, 'train_loss'):.3g}, test loss {final(table, 'test_loss'):.3g}"]
    comp = complexity_summary(table)
    if comp:
        lines.append(f"complexity at eps {comp['eps']:g}: peak {comp['peak_bytes']:,.0f} B at epoch {comp['peak_epoch']}, "
                     f"final {comp['final_bytes']:,.0f} B at epoch {comp['final_epoch']} "
                     f"(peak/final {comp['peak_over_final']:.1f}x, naive/final {comp['naive_over_final']:.1f}x)")
    if plot:
        from mdlgrok.plots import rise_and_fall

        files = rise_and_fall(table, plot, title=run.run_id)
        lines.append("figure: " + ", ".join(str(f) for f in files))
    lines.append(f"results: {run.metrics} (pandas.read_parquet), checkpoints in {run.ckpt_dir}")
    return "\n".join(lines)
