"""Seaborn figures drawn from tidy tables only (no science computed here).

Every figure: log-scaled epochs, accuracy and complexity together as in the paper, a band
over seeds where a table holds several runs of one config. Saved as PDF and PNG.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402


def save(fig, path: str | Path) -> list[Path]:
    """Write the figure as PDF and PNG (the suffix of `path` is replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = [path.with_suffix(".pdf"), path.with_suffix(".png")]
    for p in out:  # no creation date in the PDF: the same table gives the same bytes
        fig.savefig(p, dpi=150, bbox_inches="tight", metadata={"CreationDate": None} if p.suffix == ".pdf" else None)
    plt.close(fig)
    return out


def rise_and_fall(
    table: pd.DataFrame, path: str | Path, eps: float = 0.5, hue: str | None = None, title: str = ""
) -> list[Path]:
    """Accuracy (top) and complexity in kB at one eps (bottom) against epoch, log-scaled."""
    sns.set_theme(style="whitegrid", context="paper")
    fig, (ax_acc, ax_c) = plt.subplots(2, 1, figsize=(6, 5.5), sharex=True)
    acc = table[table.metric.isin(["train_acc", "test_acc"])]
    sns.lineplot(acc, x="epoch", y="value", hue=hue, style="metric", errorbar=("pi", 100), ax=ax_acc)
    ax_acc.set(ylabel="accuracy", xscale="log", title=title)
    comp = table[(table.metric == "complexity_bits") & (table.eps == eps)].assign(kB=lambda d: d.value / 8e3)
    if len(comp):
        sns.lineplot(comp, x="epoch", y="kB", hue=hue, errorbar=("pi", 100), marker="o", ax=ax_c)
    ax_c.set(ylabel=f"complexity at eps={eps:g} (kB)", xlabel="epoch", xscale="log")
    return save(fig, path)


def complexity_by_eps(table: pd.DataFrame, path: str | Path, title: str = "") -> list[Path]:
    """Complexity in kB against epoch, one line per eps."""
    sns.set_theme(style="whitegrid", context="paper")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    comp = table[table.metric == "complexity_bits"].assign(kB=lambda d: d.value / 8e3)
    sns.lineplot(comp, x="epoch", y="kB", hue="eps", palette="viridis", errorbar=("pi", 100), ax=ax)
    ax.set(xscale="log", ylabel="complexity (kB)", title=title)
    return save(fig, path)


def final_by_eps(final: pd.DataFrame, path: str | Path, hue: str | None = None) -> list[Path]:
    """At the last epoch: complexity (kB) and compression ratio against eps, log-log (rows of one estimator)."""
    sns.set_theme(style="whitegrid", context="paper")
    fig, (ax_c, ax_r) = plt.subplots(1, 2, figsize=(9, 3.5))
    comp = final[final.metric == "complexity_bits"].assign(kB=lambda d: d.value / 8e3)
    sns.lineplot(comp, x="eps", y="kB", hue=hue, style="task", marker="o", errorbar=("pi", 100), ax=ax_c)
    ax_c.set(xscale="log", yscale="log", xlabel="eps (nats)", ylabel="complexity (kB)")
    ratio = final[final.metric == "compression_ratio"]
    sns.lineplot(ratio, x="eps", y="value", hue=hue, style="task", marker="o", errorbar=("pi", 100), ax=ax_r)
    ax_r.set(xscale="log", xlabel="eps (nats)", ylabel="naive / complexity")
    return save(fig, path)


def estimator_comparison(bench: pd.DataFrame, path: str | Path) -> list[Path]:
    """Bytes of mdlgrok's search and the paper's on the same checkpoints, per eps (a row per run
    where the benchmark covers several)."""
    sns.set_theme(style="whitegrid", context="paper")
    several = "run" in bench and bench.run.nunique() > 1
    grid = sns.catplot(
        bench,
        x="eps",
        y="bytes",
        hue="mode",
        col="epoch",
        row="run" if several else None,
        kind="bar",
        height=3,
        aspect=1.1,
        order=sorted(bench.eps.unique(), reverse=True),
    )
    grid.set(yscale="log")
    grid.set_titles("{row_name}\nepoch {col_name}" if several else "epoch {col_name}")
    return save(grid.figure, path)


def settings_summary(summary: pd.DataFrame, path: str | Path) -> list[Path]:
    """Per setting and task, points per seed: final complexity, grokking epoch, final test
    accuracy and total description length at the end of training (analysis.run_summary)."""
    sns.set_theme(style="whitegrid", context="paper")
    panels = [
        ("final_bytes", "final complexity (B)"),
        ("grokking_epoch", "grokking epoch"),
        ("final_test_acc", "final test accuracy"),
        ("total_bits", "model + data bits, end"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    order = sorted(summary.setting.unique())
    for i, (ax, (col, label)) in enumerate(zip(axes, panels)):
        data = summary.dropna(subset=[col])
        if len(data):
            sns.stripplot(data, x="setting", y=col, hue="task", order=order, dodge=False, legend=i == 0, ax=ax)
        ax.set(xlabel="", ylabel=label)
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    return save(fig, path)


def measures_against_epoch(long: pd.DataFrame, path: str | Path, title: str = "") -> list[Path]:
    """Every measure of one run scaled to [0, 1] (analysis.scaled) against epoch, accuracies dashed."""
    sns.set_theme(style="whitegrid", context="paper")
    fig, ax = plt.subplots(figsize=(7, 4))
    acc = long.measure.isin(["train_acc", "test_acc"])
    sns.lineplot(long[~acc], x="epoch", y="scaled", hue="measure", marker=".", ax=ax)
    sns.lineplot(long[acc], x="epoch", y="scaled", style="measure", color="black", ax=ax)
    ax.set(xscale="log", ylabel="scaled to [0, 1] over the run", title=title)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    return save(fig, path)


def against_size(
    summary: pd.DataFrame, x: str, path: str | Path, hue: str | None = None, style: str | None = None
) -> list[Path]:
    """Per run against a numeric setting x (train fraction, subset size D'): final test accuracy,
    grokking epoch (runs that never reach it drawn as crosses at their last epoch), peak and
    final complexity (analysis.run_summary); a second compared column (the task) as line style."""
    sns.set_theme(style="whitegrid", context="paper")
    panels = [
        ("final_test_acc", "final test accuracy"),
        ("grokking_epoch", "epoch of test acc 0.95"),
        ("peak_bytes", "peak complexity (B)"),
        ("final_bytes", "final complexity (B)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for i, (ax, (col, label)) in enumerate(zip(axes, panels)):
        sns.lineplot(summary, x=x, y=col, hue=hue, style=style, marker="o", errorbar=None, legend=i == 0, ax=ax)
        if col == "grokking_epoch":
            never = summary[summary.grokking_epoch.isna()]
            if len(never):
                ax.scatter(never[x], never.epochs, marker="x", color="black", label="never (last epoch)")
                ax.legend(fontsize=7)
            ax.set(yscale="log")
        ax.set(xlabel=x, ylabel=label)
    fig.tight_layout()
    return save(fig, path)
