"""Analysis of tidy tables: grokking epochs, peak and final complexity, description lengths and
bounds per run. Pure pandas; drawing lives in plots.py and figures.py.

A table is what `mdlgrok sweep` gathers (or one run's RunDir.read_all()): training metrics,
measure rows with eps, estimator, estimator_version and options, config columns.
"""

from __future__ import annotations

import math

import pandas as pd

from mdlgrok import mdl
from mdlgrok.config import CONFIG_COLUMNS, ESTIMATORS, GROKKED

EPS_MAIN = 0.5  # the paper's headline tolerance, nats


def main_eps(table: pd.DataFrame) -> float:
    """EPS_MAIN where the table measured it, else its largest eps. Squared-error runs (the digits
    task) take their largest eps below 0.5 nats: at 0.5 the all-zero network already qualifies."""
    measured = sorted(table.loc[table.metric == "complexity_bits", "eps"].dropna().unique())
    if is_squared_error(table) and any(e < EPS_MAIN for e in measured):
        return float(max(e for e in measured if e < EPS_MAIN))
    return EPS_MAIN if EPS_MAIN in measured or not measured else float(measured[-1])


def is_squared_error(table: pd.DataFrame) -> bool:
    """Whether the table's runs train on squared error (a loss column where it varies, else the
    digits task, which the package's experiments fit with it)."""
    if "loss" in table:
        return bool(table["loss"].eq("mse").any())
    return bool(table.get("task", pd.Series(dtype=str)).eq("digits").any())


# what an experiment compares (a column counts where it varies across the table's runs)
SETTING_COLUMNS = [
    "preset",
    "attention",
    "wd",
    "gamma",
    "sigma",
    "frac",
    "lr",
    "grad_filter",
    "subset",
    "init_scale",
    "loss",
    "width",
    "dtype",
]


def estimator_rows(table: pd.DataFrame, estimator: str = "mdlgrok") -> pd.DataFrame:
    """The table with the complexity rows of one estimator only, each run at the newest version that
    measured it; training metrics and the other measures (norms, llc, fourier) are kept."""
    if "estimator" not in table or table.estimator.eq("").all():
        return table
    plain = table[~table.estimator.isin(ESTIMATORS)]
    mine = table[table.estimator == estimator]
    if "estimator_version" in mine and len(mine):
        newest = mine.groupby("run_id").estimator_version.transform(lambda v: max(v, key=version_key))
        mine = mine[mine.estimator_version == newest]
    return pd.concat([plain, mine], ignore_index=True)


def version_key(v: str) -> tuple:
    """Sort key of an estimator version: '9' before '10', numeric parts of dotted versions compared as numbers."""
    return tuple(int(x) if x.isdigit() else -1 for x in str(v).split("."))


def first_epoch(table: pd.DataFrame, metric: str, threshold: float) -> int | None:
    """First recorded epoch where `metric` reaches `threshold` (None if never)."""
    hit = table[(table.metric == metric) & (table.value >= threshold)]
    return int(hit.epoch.min()) if len(hit) else None


def final(table: pd.DataFrame, metric: str) -> float:
    rows = table[table.metric == metric]
    return float(rows.loc[rows.epoch.idxmax(), "value"]) if len(rows) else math.nan


def complexity_summary(table: pd.DataFrame, eps: float = EPS_MAIN) -> dict | None:
    """Peak and final complexity (bytes) at eps of one run, their epochs and ratios (mdlgrok's estimator)."""
    mine = estimator_rows(table)
    c = mine[(mine.metric == "complexity_bits") & (mine.eps == eps)]
    if c.empty:
        return None
    c = c.sort_values("epoch")
    peak, last = c.loc[c.value.idxmax()], c.iloc[-1]
    naive = mine[(mine.metric == "naive_bits") & (mine.epoch == last.epoch)].value
    return {
        "eps": eps,
        "peak_bytes": peak.value / 8,
        "peak_epoch": int(peak.epoch),
        "final_bytes": last.value / 8,
        "final_epoch": int(last.epoch),
        "peak_over_final": peak.value / last.value,
        "naive_over_final": float(naive.iloc[0]) / last.value if len(naive) else math.nan,
        "estimator_version": str(c.estimator_version.iloc[-1]) if "estimator_version" in c else "",
    }


NAMED = {"preset", "attention", "grad_filter", "loss", "dtype"}  # settings named by their value alone


def with_setting(table: pd.DataFrame) -> pd.DataFrame:
    """The table with a `setting` column naming the compared fields that vary across its runs
    (e.g. "ours, softmax" or "gamma=0.03"), the hue of every figure; "all" when none varies."""
    varying = [c for c in SETTING_COLUMNS if c in table and table[c].nunique() > 1]
    if "preset" in varying:  # weights a preset implies are named by it, unless they vary within one
        varying = [c for c in varying if c in NAMED or table.groupby("preset")[c].nunique().max() > 1]

    def label(r) -> str:
        return ", ".join(str(r[c]) if c in NAMED else f"{c}={r[c]:g}" for c in varying) or "all"

    runs = table.drop_duplicates("run_id").set_index("run_id")
    return table.assign(setting=table.run_id.map(runs.apply(label, axis=1) if len(runs) else {}))


def final_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Rows of each run's last recorded epoch."""
    last = table.groupby("run_id").epoch.transform("max")
    return table[table.epoch == last]


def n_train(task: str, p: int, frac: float) -> int:
    """Training-set size of the task's own split."""
    from mdlgrok.tasks import TaskConfig, make_dataset

    return len(make_dataset(TaskConfig(task, p, frac)).y_train)


def description_table(table: pd.DataFrame, eps: float = EPS_MAIN, delta: float = 0.05) -> pd.DataFrame:
    """Per run at its last epoch: model bits, data bits, total, and generalization bounds."""
    fin = final_rows(estimator_rows(table))
    out = []
    for run_id, g in fin.groupby("run_id"):
        at = g[g.eps == eps].set_index("metric").value
        if "complexity_bits" not in at:
            continue
        plain = g[g.eps.isna()].set_index("metric").value
        first = g.iloc[0]
        p, task = int(first["p"]), str(first["task"])
        subset = first.get("subset", math.nan)
        n = int(subset) if pd.notna(subset) else n_train(task, p, float(first["frac"]))
        classes = 10 if task == "digits" else p
        k, train_err = at["complexity_bits"], 1 - at["coarse_train_acc"]
        row = {c: first[c] for c in CONFIG_COLUMNS if c in first}
        row.update(
            {
                "run_id": run_id,
                "epoch": int(first.epoch),
                "eps": eps,
                "n_train": n,
                "model_bits": k,
                "data_bits": at["data_bits"],
                "total_bits": k + at["data_bits"],
                "truth_table_bits": math.nan if task == "digits" else mdl.truth_table_bits(p),
                "test_acc": plain.get("test_acc", math.nan),
                "coarse_train_err": train_err,
                "occam": mdl.occam_bound(train_err, k, n, delta),
                "kl": mdl.kl_bound(train_err, k, n, delta),
                "catoni": mdl.catoni_bound(train_err, k, n, delta),
                "nonvacuous_bits_kl": mdl.nonvacuous_bits(train_err, n, delta, threshold=1 - 1 / classes),
                "estimator_version": str(g[g.metric == "complexity_bits"].estimator_version.iloc[0])
                if "estimator_version" in g
                else "",
            }
        )
        out.append(row)
    return pd.DataFrame(out)


def run_summary(table: pd.DataFrame, eps: float = EPS_MAIN) -> pd.DataFrame:
    """One row per run: its config and setting, grokking epoch, final test accuracy, and peak,
    final and naive complexity at eps with the total description length at the end."""
    table = table if "setting" in table else with_setting(table)
    desc = description_table(table, eps).set_index("run_id") if (table.metric == "complexity_bits").any() else None
    rows = []
    for run_id, g in table.groupby("run_id"):
        first = g.iloc[0]
        grok = first_epoch(g, "test_acc", GROKKED)
        row = {
            "run_id": run_id,
            "setting": first.setting,
            **{c: first[c] for c in dict.fromkeys([*CONFIG_COLUMNS, *SETTING_COLUMNS]) if c in first},
            "grokking_epoch": math.nan if grok is None else grok,
            "final_test_acc": final(g, "test_acc"),
        }
        comp = complexity_summary(g, eps) or {}
        row.update(
            {
                k: comp.get(k, math.nan)
                for k in ("peak_bytes", "peak_epoch", "final_bytes", "peak_over_final", "naive_over_final")
            }
        )
        row["estimator_version"] = comp.get("estimator_version", "")
        row["total_bits"] = desc.total_bits.get(run_id, math.nan) if desc is not None else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def summarize(table: pd.DataFrame, status: dict, name: str) -> str:
    """A run's short summary: when it memorized and grokked, and what its complexity did."""
    fmt = lambda e: "never" if e is None else str(e)  # noqa: E731
    lines = [
        f"run {name} ({status.get('state', 'unknown')}, {status.get('wall_s', '?')} s)",
        f"train accuracy 1.0 first at epoch {fmt(first_epoch(table, 'train_acc', 1.0))}; "
        f"test accuracy {GROKKED} first at epoch {fmt(first_epoch(table, 'test_acc', GROKKED))}",
        f"final: train acc {final(table, 'train_acc'):.4f}, test acc {final(table, 'test_acc'):.4f}, "
        f"train loss {final(table, 'train_loss'):.3g}, test loss {final(table, 'test_loss'):.3g}",
    ]
    comp = complexity_summary(table, main_eps(table))
    if comp:
        lines.append(
            f"complexity at eps {comp['eps']:g}: peak {comp['peak_bytes']:,.0f} B at epoch {comp['peak_epoch']}, "
            f"final {comp['final_bytes']:,.0f} B at epoch {comp['final_epoch']} "
            f"(peak/final {comp['peak_over_final']:.1f}x, naive/final {comp['naive_over_final']:.1f}x; "
            f"estimator mdlgrok {comp['estimator_version']})"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- measures against generalization
# Measures computed from the weights and the training set alone (restricted loss reads the test
# inputs, so it is drawn but not ranked), with the eps of complexity fixed at EPS_MAIN.
TRAIN_ONLY = [
    "complexity_bits",
    "llc",
    "excluded_loss",
    "gini_embed",
    "gini_neuron_logit",
    "weight_norm",
    "spectral_entropy",
    "effective_rank",
]
# The direction in which the literature expects each to turn as a network generalizes (the others fall):
# the Gini coefficients rise (Fourier sparsity), the excluded loss rises (Nanda et al. 2023).
RISING = {"excluded_loss", "gini_embed", "gini_neuron_logit"}
DRAWN = [*TRAIN_ONLY, "restricted_loss", "train_acc", "test_acc"]


def measure_curves(table: pd.DataFrame, eps: float = EPS_MAIN) -> pd.DataFrame:
    """One row per (run, epoch), one column per measure of DRAWN (complexity at eps, mdlgrok's newest)."""
    t = estimator_rows(table)
    t = t[t.metric.isin(DRAWN) & ((t.metric != "complexity_bits") | (t.eps == eps))]
    t = t.drop_duplicates(["run_id", "epoch", "metric"], keep="last")  # norms written by training and measured
    return t.pivot_table(index=["run_id", "epoch"], columns="metric", values="value").reset_index()


def scaled(curves: pd.DataFrame) -> pd.DataFrame:
    """Each measure of each run scaled to [0, 1] over its epochs (min to max), long format."""
    long = curves.melt(id_vars=["run_id", "epoch"], var_name="measure", value_name="value").dropna()
    g = long.groupby(["run_id", "measure"]).value
    span = (g.transform("max") - g.transform("min")).replace(0, float("nan"))
    return long.assign(scaled=(long.value - g.transform("min")) / span)


def turn_epoch(epochs: pd.Series, values: pd.Series, rising: bool) -> float:
    """The first epoch after the extreme where the curve has gone half way from it to its final value:
    for a falling measure the fall after its peak, for a rising one the rise after its trough."""
    v = values.to_numpy() * (1 if not rising else -1)
    e = epochs.to_numpy()
    if len(v) < 3:
        return math.nan
    peak = int(v.argmax())
    half = v[peak] - 0.5 * (v[peak] - v[-1])
    after = [i for i in range(peak, len(v)) if v[i] <= half]
    return float(e[after[0]]) if after and v[peak] > v[-1] else math.nan


def tracking_table(curves: pd.DataFrame) -> pd.DataFrame:
    """How well each train-only measure tracks test accuracy over all checkpoints of all runs:
    Spearman rank correlation (pooled), and per run the lead in epochs of the measure's turn
    (the fall half way from its peak, or for the RISING measures the rise from its trough)
    before test accuracy's rise half way from its first to its best value (positive: the measure
    moves first), median over the runs where both turn."""
    rows = []
    for measure in [m for m in TRAIN_ONLY if m in curves]:
        both = curves[["run_id", "epoch", measure, "test_acc"]].dropna()
        if len(both) < 3:
            continue
        rho = both[measure].rank().corr(both.test_acc.rank())
        rising = measure in RISING
        leads = []
        for _, run in both.sort_values("epoch").groupby("run_id"):
            acc = run.test_acc.to_numpy()
            half = acc[0] + 0.5 * (acc.max() - acc[0])
            if acc.max() - acc[0] < 0.5:  # no generalization to time against
                continue
            rise = float(run.epoch.to_numpy()[(acc >= half).argmax()])
            leads.append(rise - turn_epoch(run.epoch, run[measure], rising))
        leads = [x for x in leads if not math.isnan(x)]
        rows.append(
            {
                "measure": measure,
                "spearman_test_acc": rho,
                "runs": both.run_id.nunique(),
                "checkpoints": len(both),
                "runs_timed": len(leads),
                "median_lead_epochs": float(pd.Series(leads).median()) if leads else math.nan,
            }
        )
    return pd.DataFrame(rows)


MEMORIZED = 0.99  # training accuracy at which a run counts as having memorized its training set


def literature_checks(curves: pd.DataFrame) -> pd.DataFrame:
    """Per run, the shapes the literature reports, read off its curves: the LLC's peak (epoch, and
    final / peak: Lau et al. see it peak at memorization and end lower), and the embedding's Gini,
    the excluded and the restricted loss at memorization (first train acc >= MEMORIZED) and at the
    end (Nanda et al.: the Gini and the excluded loss rise, the restricted loss falls, as a network
    groks). NaN where a run lacks the measure or never memorizes."""
    rows = []
    for run_id, run in curves.sort_values("epoch").groupby("run_id"):
        mem = _first(run, "train_acc", MEMORIZED)
        row = {"run_id": run_id, "memorized_epoch": mem, "grokked_epoch": _first(run, "test_acc", GROKKED)}
        if "llc" in run and run.llc.notna().any():
            llc = run.dropna(subset=["llc"])
            peak = llc.loc[llc.llc.idxmax()]
            row.update(llc_peak_epoch=int(peak.epoch), llc_peak=peak.llc, llc_final=llc.llc.iloc[-1])
        for m in ("gini_embed", "excluded_loss", "restricted_loss"):
            vals = run.dropna(subset=[m]) if m in run else run.iloc[:0]
            at_mem = vals[vals.epoch >= mem] if not math.isnan(mem) else vals.iloc[:0]
            row[f"{m}_memorized"] = at_mem[m].iloc[0] if len(at_mem) else math.nan
            row[f"{m}_final"] = vals[m].iloc[-1] if len(vals) else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _first(run: pd.DataFrame, metric: str, threshold: float) -> float:
    hit = run[run[metric] >= threshold] if metric in run else run.iloc[:0]
    return float(hit.epoch.iloc[0]) if len(hit) else math.nan


# ---------------------------------------------------------------- beside the paper's figures
PAPER_EPOCHS = (917, 2015, 9727)  # epochs at which DeMoss et al.'s figures are read off (sec. 2 of the docs)


def paper_numbers(table: pd.DataFrame, eps: float = EPS_MAIN) -> pd.DataFrame:
    """Per run, the numbers the paper's figures show: peak complexity (bytes) and its epoch,
    bytes at epochs 917, 2015 and 9727, the grokking epoch, final test accuracy, naive/final."""
    table = table if "setting" in table else with_setting(table)
    rows = []
    for run_id, g in estimator_rows(table).groupby("run_id"):
        c = g[(g.metric == "complexity_bits") & (g.eps == eps)].set_index("epoch").value.sort_index()
        if c.empty:
            continue
        first = g.iloc[0]
        comp = complexity_summary(g, eps) or {}
        grok = first_epoch(g, "test_acc", GROKKED)
        row = {
            "run_id": run_id,
            "task": first.task,
            "setting": first.setting,
            "preset": first.preset,
            "seed": first.seed,
            "epochs": int(g.epoch.max()),
            "peak_bytes": comp.get("peak_bytes"),
            "peak_epoch": comp.get("peak_epoch"),
            **{f"bytes_at_{e}": float(c[e]) / 8 if e in c.index else math.nan for e in PAPER_EPOCHS},
            "final_bytes": comp.get("final_bytes"),
            "peak_over_final": comp.get("peak_over_final"),
            "grokking_epoch": math.nan if grok is None else grok,
            "final_test_acc": final(g, "test_acc"),
            "naive_over_final": comp.get("naive_over_final"),
            "estimator_version": comp.get("estimator_version"),
        }
        rows.append(row)
    return pd.DataFrame(rows)
