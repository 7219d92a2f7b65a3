"""Experiment files and run keys: an experiment's grid of TrainConfigs, each with its folder name.

An experiment file (TOML):

    name = "rise_and_fall"           # runs go to <root>/<name>/<key>/
    [base]                           # TrainConfig fields shared by every run
    p = 113
    [grid]                           # lists; the runs are their cartesian product
    task = ["add", "mul"]
    seed = [0, 1, 2]
    [lengths]                        # epochs, chosen with --length (default cpu)
    cpu = 600
    paper = 10000
    [measure]                        # MeasureConfig fields; absent: the runs are not measured
    eps = [4, 2, 1, 0.5, 0.25, 0.125, 0.0625]

`[[grid]]` (an array of tables) gives the union of several products; identical resolved
configs run once. A run's folder is keyed by a hash of its resolved TrainConfig (`run_key`):
what is measured never enters it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mdlgrok.config import OFF_VALUES, MeasureConfig, TrainConfig, canonical, coerce
from mdlgrok.regularizers import preset as reg_preset

try:
    import tomllib
except ImportError:  # pragma: no cover - python 3.10
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

TOP_LEVEL = {"name", "description", "measure", "base", "grid", "lengths"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Experiment:
    """A parsed experiment file: shared fields, one or more grids, lengths."""

    name: str
    base: dict[str, Any] = field(default_factory=dict)
    grids: list[dict[str, list]] = field(default_factory=lambda: [{}])  # the union of their products
    lengths: dict[str, int] = field(default_factory=dict)  # length name -> epochs
    measure: MeasureConfig | None = None  # how its runs are measured (None: not measured)
    description: str = ""
    source: str = "<experiment>"

    @classmethod
    def from_dict(cls, d: dict, source: str = "<experiment>") -> Experiment:
        where = source
        if not isinstance(d, dict):
            raise ValueError(f"{where}: an experiment is a table")
        unknown = sorted(set(d) - TOP_LEVEL)
        if unknown:
            raise ValueError(
                f"{where}: unknown top-level key(s) {', '.join(map(repr, unknown))}; "
                f"expected {', '.join(sorted(TOP_LEVEL))}"
            )
        if "name" not in d and source == "<experiment>":
            raise ValueError(f"{where}: an experiment needs a name")
        name = d.get("name", Path(source).stem)  # a file's name defaults to its stem
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ValueError(f"{where}: name must be a folder name (letters, digits, '.', '_', '-'), got {name!r}")
        base = d.get("base", {})
        if not isinstance(base, dict):
            raise ValueError(f"{where}: [base] must be a table of TrainConfig fields")
        base = {k: coerce(TrainConfig, k, v, f"{where} [base]") for k, v in base.items()}
        measure = parse_measure(d.get("measure"), where)
        raw_grids = d.get("grid", {})
        if isinstance(raw_grids, dict):
            raw_grids = [raw_grids]
        if not isinstance(raw_grids, list) or not raw_grids or not all(isinstance(g, dict) for g in raw_grids):
            raise ValueError(f"{where}: [grid] must be a table (or [[grid]] tables) of lists")
        grids = [
            parse_grid(g, f"{where} [grid]" if len(raw_grids) == 1 else f"{where} [[grid]] #{i + 1}")
            for i, g in enumerate(raw_grids)
        ]
        lengths = d.get("lengths", {})
        if not isinstance(lengths, dict):
            raise ValueError(f"{where}: [lengths] must be a table of name = epochs")
        for k, v in lengths.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{where} [lengths]: {k} must be a positive number of epochs, got {v!r}")
        if lengths and ("epochs" in base or any("epochs" in g for g in grids)):
            raise ValueError(f"{where}: set epochs either in [lengths] or in [base]/[grid], not both")
        description = d.get("description", "")
        if not isinstance(description, str):
            raise ValueError(f"{where}: description must be a string")
        return cls(
            name=name,
            base=base,
            grids=grids,
            lengths=dict(lengths),
            measure=measure,
            description=description,
            source=source,
        )

    def grid_fields(self) -> list[str]:
        """Fields that some grid varies, in order of first appearance."""
        return list(dict.fromkeys(k for g in self.grids for k in g))

    def resolve_length(self, length: str | None) -> int | None:
        """Epochs for a length name (None: `cpu` when the file has lengths, else the fields' epochs)."""
        if not self.lengths:
            if length is not None:
                raise ValueError(f"{self.source}: --length {length}: the experiment has no [lengths] table")
            return None
        length = "cpu" if length is None else length
        if length not in self.lengths:
            raise ValueError(f"{self.source}: unknown length {length!r}; choose from {', '.join(self.lengths)}")
        return self.lengths[length]


def parse_grid(grid: dict, where: str) -> dict[str, list]:
    out = {}
    for k, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}: {k} must be a non-empty list of values, got {values!r}")
        out[k] = [coerce(TrainConfig, k, v, where) for v in values]
    return out


def parse_measure(value: Any, where: str) -> MeasureConfig | None:
    """[measure] (a table of MeasureConfig fields), `measure = true` (the defaults) or nothing."""
    if value is None or value is False:
        return None
    if value is True:
        return MeasureConfig()
    if not isinstance(value, dict):
        raise ValueError(f"{where}: measure must be true or a [measure] table of MeasureConfig fields")
    kw = {k: coerce(MeasureConfig, k, v, f"{where} [measure]") for k, v in value.items()}
    try:
        return MeasureConfig(**kw)
    except ValueError as exc:
        raise ValueError(f"{where} [measure]: {exc}") from None


def load_experiment(experiment: str | Path | dict | Experiment) -> Experiment:
    """An Experiment from a TOML file, a dict of the same shape, or an Experiment."""
    if isinstance(experiment, Experiment):
        return experiment
    if isinstance(experiment, dict):
        return Experiment.from_dict(experiment)
    path = Path(experiment)
    if not path.is_file():
        raise FileNotFoundError(f"experiment file {path} does not exist")
    if tomllib is None:  # pragma: no cover - python 3.10 without tomli
        raise ValueError("reading experiment files needs python >= 3.11 or the tomli package")
    try:
        d = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file") from None
    return Experiment.from_dict(d, source=str(path))


def expand(experiment: str | Path | dict | Experiment, length: str | None = None) -> list[TrainConfig]:
    """Every run of the experiment, validated; identical resolved configs appear once."""
    exp = load_experiment(experiment)
    epochs = exp.resolve_length(length)
    configs: dict[str, TrainConfig] = {}
    for grid in exp.grids:
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            point = dict(zip(keys, values))
            kw = {**exp.base, **point}
            if epochs is not None:
                kw["epochs"] = epochs
            try:
                cfg = TrainConfig(**kw)
            except (TypeError, ValueError) as exc:
                at = ", ".join(f"{k}={v!r}" for k, v in point.items()) or "the [base] config"
                raise ValueError(f"{exp.source}: invalid run ({at}): {exc}") from None
            configs.setdefault(run_key(cfg), cfg)
    return list(configs.values())


def config_hash(cfg: TrainConfig, n: int = 12) -> str:
    """sha256 of the config's effective fields: options that are switched off (no gradient filter,
    config.OFF_VALUES) do not enter it, so adding such an option keeps every other key."""
    text = json.dumps(effective(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def effective(cfg: TrainConfig) -> dict:
    d = canonical(cfg)
    if d["grad_filter"] == "none":
        for k in ("grad_filter", "grad_alpha", "grad_lambda"):
            d.pop(k)
    return {k: v for k, v in d.items() if not (k in OFF_VALUES and v == OFF_VALUES[k])}


def run_key(cfg: TrainConfig) -> str:
    """A stable, readable folder name: task-preset[-overrides]-s<seed>-<sha256 of the config, 12 hex>.

    The readable part names the task, preset, non-default attention or model, and the
    regularizer weights that override the preset; the hash alone makes keys distinct.
    """
    parts = [cfg.task, cfg.preset]
    if cfg.attention != TrainConfig.__dataclass_fields__["attention"].default:
        parts.append(cfg.attention)
    if cfg.model != TrainConfig.__dataclass_fields__["model"].default:
        parts.append(cfg.model)
    base = reg_preset(cfg.preset, cfg.task)
    for name, short in (("wd", "wd"), ("gamma", "g"), ("sigma", "n")):
        if getattr(cfg, name) != getattr(base, name):
            parts.append(f"{short}{getattr(cfg, name):g}")
    defaults = TrainConfig(task=cfg.task, model=cfg.model)
    for name, short in (("frac", "f"), ("lr", "lr")):
        if getattr(cfg, name) != getattr(defaults, name):
            parts.append(f"{short}{getattr(cfg, name):g}")
    if cfg.grad_filter != "none":
        parts.append(f"{cfg.grad_filter}{cfg.grad_lambda:g}")
    if cfg.init_from:
        parts.append("init")
    if cfg.subset:
        parts.append(f"D{cfg.subset}")
    for name, short in (("width", "w"), ("init_scale", "a")):
        if getattr(cfg, name) != OFF_VALUES[name]:
            parts.append(f"{short}{getattr(cfg, name):g}")
    parts += [getattr(cfg, name) for name in ("loss", "dtype") if getattr(cfg, name) != OFF_VALUES[name]]
    parts.append(f"s{cfg.seed}")
    return "-".join(parts + [config_hash(cfg)])
