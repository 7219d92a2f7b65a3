"""Every committed figure and table, redrawn from saved tidy tables without training.

    mdlgrok figures --results results

For each experiment folder under `results/` holding a `table.parquet` (written by
`mdlgrok sweep`), the figures of that experiment are drawn beside it, with the configs
and seeds written to `<folder>/figure_configs.json`. What is computed comes from
mdlgrok.analysis; this module only draws and writes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from mdlgrok import plots
from mdlgrok.analysis import (
    PAPER_EPOCHS,
    description_table,
    estimator_rows,
    final_rows,
    literature_checks,
    main_eps,
    measure_curves,
    paper_numbers,
    run_summary,
    scaled,
    tracking_table,
    version_key,
    with_setting,
)
from mdlgrok.config import CONFIG_COLUMNS


def _write_configs(folder: Path, table: pd.DataFrame) -> None:
    cols = [c for c in ["run_id"] + CONFIG_COLUMNS if c in table]
    configs = table[cols].drop_duplicates().sort_values(cols[1:]).to_dict("records")
    (folder / "figure_configs.json").write_text(json.dumps(configs, indent=1, default=str) + "\n")


def _provenance(rows: pd.DataFrame) -> str:
    """' (N seeds, estimator vA, vB)' as the rows say: what a figure's mean and band are made of."""
    seeds = rows.seed.nunique() if "seed" in rows else 1
    text = f"{seeds} seed{'s' if seeds != 1 else ''}"
    if "estimator_version" in rows:
        measured = rows[rows.metric == "complexity_bits"].estimator_version.dropna()
        versions = sorted({str(v) for v in measured if str(v)}, key=version_key)
        if versions:
            text += ", estimator " + ", ".join(f"v{v}" for v in versions)
    return f" ({text})"


def draw_experiment(folder: Path) -> list[Path]:
    """Figures of one experiment folder; which ones depends on what its table varies."""
    table = pd.read_parquet(folder / "table.parquet")
    _write_configs(folder, table)
    out: list[Path] = []
    table = with_setting(table)
    drawn = estimator_rows(table)  # complexity as mdlgrok's estimator measured it
    hue = "setting" if table.setting.nunique() > 1 else None
    eps = main_eps(table)
    for task, sub in drawn.groupby("task"):
        out += plots.rise_and_fall(
            sub, folder / f"rise_and_fall_{task}", eps=eps, hue=hue, title=f"{folder.name}: {task}{_provenance(sub)}"
        )
    fin = final_rows(drawn)
    if (fin.metric == "complexity_bits").any():
        out += plots.final_by_eps(fin, folder / "final_complexity_vs_eps", hue=hue)
        desc = description_table(table, eps)
        if len(desc):
            desc.to_csv(folder / "description_lengths.csv", index=False)
            out.append(folder / "description_lengths.csv")
    out += draw_measures(table, folder, eps)
    if table.epoch.max() >= max(PAPER_EPOCHS) and (table.task != "digits").all():  # a paper-length table
        paper_numbers(table).to_csv(folder / "paper_numbers.csv", index=False)
        out.append(folder / "paper_numbers.csv")
    summary = run_summary(table, eps)
    summary.to_csv(folder / "summary.csv", index=False)
    out.append(folder / "summary.csv")
    out += plots.settings_summary(summary, folder / "summary")
    for size in SIZES:  # an experiment over data sizes: everything against the size
        if size in table and table.groupby("task")[size].nunique().max() > 1:  # varies within a task
            hue, style = size_roles(summary)
            out += plots.against_size(summary, size, folder / f"against_{size}", hue=hue, style=style)
    return out


SIZES = ("frac", "subset")  # numeric settings that figures draw results against


def size_roles(summary: pd.DataFrame) -> tuple[str | None, str | None]:
    """Hue and line style of the figures against a size: the preset and the task, in that order,
    where each varies across the summary's runs."""
    varying = [c for c in ("preset", "task") if c in summary and summary[c].nunique() > 1]
    return tuple(varying + [None] * (2 - len(varying)))


def draw_measures(table: pd.DataFrame, folder: Path, eps: float) -> list[Path]:
    """Where a table holds measures beside complexity (llc, fourier): one figure per run of every
    measure scaled to [0, 1] against epoch, measures_tracking.csv (analysis.tracking_table) and
    literature_checks.csv (analysis.literature_checks)."""
    if not table.metric.isin(["llc", "gini_embed"]).any():
        return []
    curves = measure_curves(table, eps)
    out = []
    names = table.drop_duplicates("run_id").set_index("run_id")
    for run_id, long in scaled(curves).groupby("run_id"):
        r = names.loc[run_id]
        out += plots.measures_against_epoch(
            long,
            folder / f"measures_{r.task}_{file_name(r.setting)}_s{r.seed}",
            title=f"{folder.name}: {run_id}",
        )
    tracking_table(curves).to_csv(folder / "measures_tracking.csv", index=False)
    literature_checks(curves).to_csv(folder / "literature_checks.csv", index=False)
    return [*out, folder / "measures_tracking.csv", folder / "literature_checks.csv"]


def file_name(setting: str) -> str:
    """A setting ("ours, lr=0.003") as part of a file name ("ours_lr0p003"): no dots, which
    would read as a suffix."""
    return re.sub(r"[^A-Za-z0-9_-]", "", setting.replace(", ", "_").replace(".", "p"))


def draw_estimator(path: Path) -> list[Path]:
    """The estimator comparison (benchmarks/bench_estimator.py --out) as a figure."""
    return plots.estimator_comparison(pd.read_parquet(path), path.with_suffix(""))


def draw_all(results: str | Path = "results", only: list[str] | None = None) -> list[Path]:
    """Every figure of the tables under `results`; with `only`, of those folders alone (relative
    to `results`: an experiment such as digits or paper/rise_and_fall, or estimator)."""
    results = Path(results)
    # results/<experiment>/table.parquet, results/paper/<experiment>/table.parquet: one per folder
    tables = {t.parent.relative_to(results).as_posix(): t for t in sorted(results.glob("**/table.parquet"))}
    benches = sorted(results.glob("estimator/bench*.parquet"))
    if only is not None:
        wanted, known = {name.strip("/") for name in only}, set(tables) | ({"estimator"} if benches else set())
        if wanted - known:
            missing = min(wanted - known)
            raise FileNotFoundError(f"no tables under {results}/{missing}/ (there are: {', '.join(sorted(known))})")
        tables = {name: t for name, t in tables.items() if name in wanted}
        benches = benches if "estimator" in wanted else []
    out: list[Path] = []
    for table in tables.values():
        out += draw_experiment(table.parent)
    for bench in benches:
        out += draw_estimator(bench)
    if not out:
        raise FileNotFoundError(f"no tables under {results}/ (run the make targets of the experiments first)")
    return out
