"""Every committed figure and table, redrawn from saved tidy tables without training.

    mdlgrok figures --results results

For each experiment folder under `results/` holding a `table.parquet` (written by
`mdlgrok sweep`), the figures of that experiment are drawn beside it, with the configs
and seeds written to `<folder>/figure_configs.json`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from mdlgrok import mdl, plots
from mdlgrok.summary import complexity_summary, first_epoch, final
from mdlgrok.tasks import TaskConfig, make_dataset

EPS_MAIN = 0.5  # the paper's headline tolerance
CONFIG_COLUMNS = ["task", "p", "frac", "preset", "attention", "layers", "wd", "gamma", "sigma", "seed", "epochs"]
SETTING_COLUMNS = ["preset", "attention", "wd", "gamma", "sigma"]  # what an experiment compares
GROKKED = 0.95  # test accuracy that counts as grokked


def with_setting(table: pd.DataFrame) -> pd.DataFrame:
    """The table with a `setting` column naming the compared fields that vary across its runs
    (e.g. "ours, softmax" or "gamma=0.03"), the hue of every figure; "all" when none varies."""
    varying = [c for c in SETTING_COLUMNS if c in table and table[c].nunique() > 1]
    if "preset" in varying:  # weights a preset implies are named by it, unless they vary within one
        varying = [c for c in varying if c in ("preset", "attention") or table.groupby("preset")[c].nunique().max() > 1]
    named = {"preset", "attention"}

    def label(r) -> str:
        return ", ".join(str(r[c]) if c in named else f"{c}={r[c]:g}" for c in varying) or "all"

    runs = table.drop_duplicates("run_id").set_index("run_id")
    return table.assign(setting=table.run_id.map(runs.apply(label, axis=1) if len(runs) else {}))


def run_summary(table: pd.DataFrame, eps: float = EPS_MAIN) -> pd.DataFrame:
    """One row per run: its config and setting, grokking epoch, final test accuracy, and peak,
    final and naive complexity at eps with the total description length at the end."""
    table = table if "setting" in table else with_setting(table)
    desc = description_table(table, eps).set_index("run_id") if (table.metric == "complexity_bits").any() else None
    rows = []
    for run_id, g in table.groupby("run_id"):
        first = g.iloc[0]
        row = {"run_id": run_id, "setting": first.setting, **{c: first[c] for c in CONFIG_COLUMNS if c in first},
               "grokking_epoch": first_epoch(g, "test_acc", GROKKED), "final_test_acc": final(g, "test_acc")}
        row["grokking_epoch"] = math.nan if row["grokking_epoch"] is None else row["grokking_epoch"]  # never
        comp = complexity_summary(g, eps) or {}
        row.update({k: comp.get(k, math.nan) for k in ("peak_bytes", "peak_epoch", "final_bytes", "peak_over_final",
                                                      "naive_over_final")})
        row["total_bits"] = desc.total_bits.get(run_id, math.nan) if desc is not None else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def final_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Rows of each run's last recorded epoch."""
    last = table.groupby("run_id").epoch.transform("max")
    return table[table.epoch == last]


def n_train(task: str, p: int, frac: float) -> int:
    """Training-set size of the task's own split."""
    return len(make_dataset(TaskConfig(task, p, frac)).y_train)


def description_table(table: pd.DataFrame, eps: float = EPS_MAIN, delta: float = 0.05) -> pd.DataFrame:
    """Per run at its last epoch: model bits, data bits, total, and generalization bounds."""
    fin = final_rows(table)
    out = []
    for run_id, g in fin.groupby("run_id"):
        at = g[(g.eps == eps) & (g.estimator == "mdlgrok")].set_index("metric").value
        if "complexity_bits" not in at:
            continue
        plain = g[g.eps.isna()].set_index("metric").value
        first = g.iloc[0]
        p = int(first["p"])
        n = n_train(str(first["task"]), p, float(first["frac"]))
        k, train_err = at["complexity_bits"], 1 - at["coarse_train_acc"]
        row = {c: first[c] for c in CONFIG_COLUMNS if c in first}
        row.update({"run_id": run_id, "epoch": int(first.epoch), "eps": eps, "n_train": n, "model_bits": k,
                    "data_bits": at["data_bits"], "total_bits": k + at["data_bits"],
                    "truth_table_bits": mdl.truth_table_bits(p), "test_acc": plain.get("test_acc", math.nan),
                    "coarse_train_err": train_err, "occam": mdl.occam_bound(train_err, k, n, delta),
                    "kl": mdl.kl_bound(train_err, k, n, delta), "catoni": mdl.catoni_bound(train_err, k, n, delta),
                    "nonvacuous_bits_kl": mdl.nonvacuous_bits(train_err, n, delta, threshold=1 - 1 / p)})
        out.append(row)
    return pd.DataFrame(out)


def _write_configs(folder: Path, table: pd.DataFrame) -> None:
    cols = [c for c in ["run_id"] + CONFIG_COLUMNS if c in table]
    configs = table[cols].drop_duplicates().sort_values(cols[1:]).to_dict("records")
    (folder / "figure_configs.json").write_text(json.dumps(configs, indent=1, default=str) + "\n")


def draw_experiment(folder: Path) -> list[Path]:
    """Figures of one experiment folder; which ones depends on what its table varies."""
    table = pd.read_parquet(folder / "table.parquet")
    _write_configs(folder, table)
    out: list[Path] = []
    table = with_setting(table)
    hue = "setting" if table.setting.nunique() > 1 else None
    for task, sub in table.groupby("task"):
        out += plots.rise_and_fall(sub, folder / f"rise_and_fall_{task}", eps=EPS_MAIN, hue=hue,
                                   title=f"{folder.name}: {task}")
    fin = final_rows(table)
    if (fin.metric == "complexity_bits").any():
        out += plots.final_by_eps(fin, folder / "final_complexity_vs_eps", hue=hue)
        desc = description_table(table)
        if len(desc):
            desc.to_csv(folder / "description_lengths.csv", index=False)
            out.append(folder / "description_lengths.csv")
    summary = run_summary(table)
    summary.to_csv(folder / "summary.csv", index=False)
    out.append(folder / "summary.csv")
    out += plots.settings_summary(summary, folder / "summary")
    return out


def draw_estimator(path: Path) -> list[Path]:
    """The estimator comparison (benchmarks/bench_estimator.py --out) as a figure."""
    return plots.estimator_comparison(pd.read_parquet(path), path.with_suffix(""))


def draw_all(results: str | Path = "results") -> list[Path]:
    results = Path(results)
    out: list[Path] = []
    for table in sorted(results.glob("*/table.parquet")):
        out += draw_experiment(table.parent)
    for bench in sorted(results.glob("estimator/bench*.parquet")):
        out += draw_estimator(bench)
    if not out:
        raise FileNotFoundError(f"no tables under {results}/ (run the make targets of the experiments first)")
    return out
