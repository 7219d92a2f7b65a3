"""Gathering: every run of an experiment folder as one tidy table (table.parquet).

Each run contributes its training metrics and its measures (MEASURE_COLUMNS: a metric row
has no eps, codec or estimator), with the run's config columns beside run_id.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pandas as pd

from mdlgrok.config import CONFIG_COLUMNS, EXTRA_COLUMNS, OFF_VALUES
from mdlgrok.runs import MEASURE_COLUMNS, METRICS_FILE, RunDir, rows_to_frame, write_table

TABLE_FILE = "table.parquet"
CONFIG_TYPES = {
    "run_id": str,
    "task": str,
    "p": "int64",
    "frac": "float64",
    "model": str,
    "layers": "int64",
    "attention": str,
    "preset": str,
    "wd": "float64",
    "gamma": "float64",
    "sigma": "float64",
    "seed": "int64",
    "epochs": "int64",
}


def gather(folder: str | Path, keys: list[str] | None = None) -> pd.DataFrame:
    """All complete or failed runs of an experiment folder (or those named by keys) as one tidy
    table, written to <folder>/table.parquet: metrics and measures rows, config columns
    (CONFIG_COLUMNS, plus EXTRA_COLUMNS that vary) beside run_id. Runs still training are left out."""
    folder = Path(folder)
    if keys is None:
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not an experiment folder")
        candidates = sorted(d for d in folder.iterdir() if d.is_dir())
    else:
        candidates = [folder / k for k in sorted(set(keys))]
    runs = [RunDir(d) for d in candidates if (d / METRICS_FILE).is_file() and (d / "config.json").is_file()]
    runs = [r for r in runs if r.read_status().get("state") != "running"]  # no half-trained run in a table
    if not runs and keys is None:
        raise FileNotFoundError(f"{folder} holds no run with a {METRICS_FILE}")
    if not runs:  # every run failed before its first checkpoint
        return pd.DataFrame({c: pd.Series(dtype=object) for c in ["run_id", *CONFIG_COLUMNS, *MEASURE_COLUMNS[1:]]})
    metrics = pd.read_parquet([str(r.metrics) for r in runs])
    measured = [str(r.measures) for r in runs if r.measures.is_file()]
    rows = pd.concat(
        [rows_to_frame(metrics.to_dict("records"), MEASURE_COLUMNS)]
        + ([pd.read_parquet(measured)] if measured else []),
        ignore_index=True,
    )
    table = with_configs(rows, [{"run_id": r.path.name, **json.loads(r.config.read_text())} for r in runs])
    write_table(folder / TABLE_FILE, table)
    return table


def with_configs(rows: pd.DataFrame, configs: list[dict]) -> pd.DataFrame:
    """rows with each run's config columns joined beside run_id."""
    configs = pd.DataFrame(configs)
    extras = [
        c for c in EXTRA_COLUMNS if c in configs and (configs[c].astype(str).nunique() > 1 or switched_on(configs[c]))
    ]
    configs = configs[["run_id", *CONFIG_COLUMNS, *extras]].astype(CONFIG_TYPES)
    table = rows.merge(configs, on="run_id", how="left", validate="many_to_one")
    return table[["run_id", *CONFIG_COLUMNS, *extras, *MEASURE_COLUMNS[1:]]]


def switched_on(column: pd.Series) -> bool:
    """Whether any run sets an option that is off by default (config.OFF_VALUES): a subset or an
    init scale stays a column even when every run of the table shares it."""
    if column.name not in OFF_VALUES:
        return False
    off = OFF_VALUES[column.name]
    return bool(column.map(lambda v: not (v is None or (isinstance(v, float) and math.isnan(v))) and v != off).any())


def convert_table(
    table: pd.DataFrame,
    versions: dict[str, str] | None = None,
    options: dict[str, str] | None = None,
    default_version: str = "unknown",
) -> pd.DataFrame:
    """A gathered table of an older version in the current layout: run ids renamed to the current
    run keys, estimator_version and options columns added to its measure rows (`versions` and
    `options` map an old run id to them; older tables did not record them)."""
    from mdlgrok.config import TrainConfig
    from mdlgrok.sweep.spec import run_key

    if "estimator_version" in table:
        return table
    versions, options = versions or {}, options or {}
    measured = table.eps.notna() | (table.estimator != "")
    table = table.assign(
        estimator_version=table.run_id.map(lambda r: versions.get(r, default_version)).where(measured, ""),
        options=table.run_id.map(lambda r: options.get(r, "{}")).where(measured, ""),
    )
    runs = table.drop_duplicates("run_id")
    fields = [c for c in table.columns if c in TrainConfig.__dataclass_fields__]
    eps = tuple(sorted(set(table.eps.dropna()), reverse=True))
    keys = {}
    for r in runs.to_dict("records"):
        cfg = TrainConfig(**{c: _plain(r[c]) for c in fields})  # fields without a column take their defaults
        if not _older_key_matches(r["run_id"], cfg, eps):
            raise ValueError(
                f"run {r['run_id']}: the table's config columns do not give back the config its key "
                "hashes; convert the run folders (mdlgrok convert) and gather them again"
            )
        keys[r["run_id"]] = run_key(cfg)
    cols = [c for c in table.columns if c not in MEASURE_COLUMNS[1:]] + MEASURE_COLUMNS[1:]
    return table.assign(run_id=table.run_id.map(keys))[cols]


OLDER_FIELDS = [
    "task",
    "p",
    "frac",
    "model",
    "layers",
    "attention",
    "pos_rows",
    "preset",
    "wd",
    "gamma",
    "sigma",
    "noise",
    "lr",
    "betas",
    "adam_eps",
    "batch",
    "epochs",
    "seed",
]


def _older_key_matches(old_key: str, cfg, eps: tuple) -> bool:
    """Whether the older key's hash (of the TrainConfig fields of its time plus `measure` and `eps`)
    is that of cfg, for one of the measure settings a table can have had: the check that every
    field, also those without a column, was recovered."""
    from mdlgrok.config import PAPER_EPS, canonical

    d = {k: v for k, v in canonical(cfg).items() if k in OLDER_FIELDS}
    for measure in (True, False):
        for e in {tuple(PAPER_EPS), eps}:
            text = json.dumps({**d, "measure": measure, "eps": list(e)}, sort_keys=True, separators=(",", ":"))
            if old_key.endswith("-" + hashlib.sha256(text.encode()).hexdigest()[:12]):
                return True
    return False


def _plain(v):
    return v.item() if hasattr(v, "item") else v
