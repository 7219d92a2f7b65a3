"""mdlgrok.config: TrainConfig and MeasureConfig, their validation, TOML coercion and flags."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import fields

import pytest
from conftest import tiny_config

from mdlgrok.config import (
    CONFIG_COLUMNS,
    GROKKED,
    PAPER_EPS,
    MeasureConfig,
    TrainConfig,
    add_arguments,
    canonical,
    coerce,
    from_arguments,
)
from mdlgrok.measures import MEASURES


# ---------------------------------------------------------------- TrainConfig
def test_constants():
    assert PAPER_EPS == (4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625)
    assert GROKKED == 0.95
    names = {f.name for f in fields(TrainConfig)}
    assert set(CONFIG_COLUMNS) <= names and len(set(CONFIG_COLUMNS)) == len(CONFIG_COLUMNS)


def test_every_field_is_documented():
    for cls in (TrainConfig, MeasureConfig):
        for f in fields(cls):
            assert f.metadata.get("help"), (cls.__name__, f.name)


def test_train_config_has_no_measure_settings():
    names = {f.name for f in fields(TrainConfig)}
    assert "measure" not in names and "eps" not in names
    with pytest.raises(TypeError):
        TrainConfig(p=7, eps=(0.5,))  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(epochs=0), "epochs"),
        (dict(lr=0.0), "learning rate"),
        (dict(lr=-1e-3), "learning rate"),
        (dict(batch=-1), "batch"),
        (dict(betas=(0.9,)), "betas must be two numbers"),
        (dict(betas=(0.9, 0.98, 0.999)), "betas must be two numbers"),
        (dict(task="mod"), "unknown task"),
        (dict(preset="max"), "preset"),
        (dict(model="rnn"), "unknown model"),
        (dict(attention="x"), "attention"),
        (dict(noise="pink"), "noise"),
        (dict(wd=-1.0), "wd must be non-negative"),
    ],
)
def test_train_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kwargs)


def test_train_config_resolves_the_papers_values():
    cfg = TrainConfig(task="sub", p=7, betas=[0.8, 1])
    assert (cfg.frac, cfg.layers, cfg.wd, cfg.gamma, cfg.sigma) == (0.3, 2, 1.0, 0.1, 1e-3)
    assert cfg.betas == (0.8, 1.0) and all(type(b) is float for b in cfg.betas)


def test_from_dict_round_trip_and_unknown_fields():
    cfg = tiny_config(wd=0.5, betas=(0.8, 0.95), pos_rows=4)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown TrainConfig field.*colour") as exc:
        TrainConfig.from_dict({**cfg.to_dict(), "colour": "red"})
    assert "mdlgrok convert" not in str(exc.value)  # only the legacy fields point at convert


@pytest.mark.parametrize("legacy", [{"measure": True}, {"eps": [0.5]}, {"measure": False, "eps": [1.0, 0.5]}])
def test_from_dict_of_an_older_config_names_mdlgrok_convert(legacy):
    d = {**tiny_config().to_dict(), **legacy}
    with pytest.raises(ValueError, match="mdlgrok convert") as exc:
        TrainConfig.from_dict(d)
    for name in legacy:
        assert name in str(exc.value)


# ---------------------------------------------------------------- MeasureConfig
def test_measure_config_defaults_and_normalization():
    m = MeasureConfig()
    assert (m.eps, m.estimator, m.measures) == (PAPER_EPS, "mdlgrok", ("complexity",))
    m = MeasureConfig(eps=[1, 0.5], estimator="paper", measures=["complexity", "norms"])
    assert m.eps == (1.0, 0.5) and all(type(e) is float for e in m.eps)
    assert m.measures == ("complexity", "norms") and set(m.measures) <= set(MEASURES)
    assert MeasureConfig(**json.loads(json.dumps(m.to_dict()))) == m


@pytest.mark.parametrize("eps", [(), (0.0,), (1.0, -0.5), (math.inf,), (math.nan,)])
def test_measure_config_rejects_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        MeasureConfig(eps=eps)


def test_measure_config_rejects_unknown_estimator_and_measures():
    with pytest.raises(ValueError, match="unknown estimator 'bayes'.*mdlgrok or paper"):
        MeasureConfig(estimator="bayes")
    with pytest.raises(ValueError, match="unknown measure.*flatness.*complexity"):
        MeasureConfig(measures=("complexity", "flatness"))
    with pytest.raises(ValueError, match="unknown measure.*none given"):
        MeasureConfig(measures=())


# ---------------------------------------------------------------- coerce (experiment files)
def test_coerce_makes_ints_floats_for_float_fields():
    for name in ("wd", "gamma", "sigma", "lr", "frac", "adam_eps"):
        v = coerce(TrainConfig, name, 1, "here")
        assert v == 1.0 and type(v) is float, name
    assert coerce(TrainConfig, "p", 113, "here") == 113
    assert coerce(TrainConfig, "task", "mul", "here") == "mul"
    assert coerce(TrainConfig, "pos_rows", None, "here") is None
    assert coerce(MeasureConfig, "estimator", "paper", "here") == "paper"


@pytest.mark.parametrize(
    "cls,name,value,match",
    [
        (TrainConfig, "p", 11.0, "p must be an integer"),
        (TrainConfig, "p", True, "p must be an integer"),  # a bool is not an int here
        (TrainConfig, "epochs", "100", "epochs must be an integer"),
        (TrainConfig, "wd", "1", "wd must be a number"),
        (TrainConfig, "wd", False, "wd must be a number"),
        (TrainConfig, "task", 3, "task must be a string"),
        (TrainConfig, "betas", 0.9, "betas must be a list of numbers"),
        (TrainConfig, "betas", [0.9, "x"], "betas must be a list of numbers"),
        (MeasureConfig, "eps", "0.5", "eps must be a list of numbers"),
        (MeasureConfig, "eps", [0.5, True], "eps must be a list of numbers"),
        (MeasureConfig, "measures", "complexity", "measures must be a list of names"),
        (MeasureConfig, "measures", ["complexity", 1], "measures must be a list of names"),
    ],
)
def test_coerce_rejects_bad_types(cls, name, value, match):
    with pytest.raises(ValueError, match=f"exp.toml \\[grid\\]: {match}"):
        coerce(cls, name, value, "exp.toml [grid]")


def test_coerce_list_fields():
    betas = coerce(TrainConfig, "betas", [0.9, 1], "here")
    assert betas == (0.9, 1.0) and all(type(b) is float for b in betas)
    eps = coerce(MeasureConfig, "eps", [4, 0.5], "here")
    assert eps == (4.0, 0.5) and all(type(e) is float for e in eps)
    assert coerce(MeasureConfig, "measures", ["complexity", "norms"], "here") == ("complexity", "norms")


def test_coerce_unknown_fields():
    with pytest.raises(ValueError, match="exp.toml: unknown TrainConfig field 'colour'; known: task, p") as exc:
        coerce(TrainConfig, "colour", 1, "exp.toml")
    assert "[measure]" not in str(exc.value)
    for legacy in ("eps", "measure"):  # measure settings left in a run's table
        with pytest.raises(
            ValueError, match=f"unknown TrainConfig field '{legacy}'; it is a measure setting: put it in \\[measure\\]"
        ):
            coerce(TrainConfig, legacy, [0.5], "exp.toml")
    with pytest.raises(ValueError, match="unknown MeasureConfig field 'seed'"):
        coerce(MeasureConfig, "seed", 0, "exp.toml [measure]")


def test_canonical_hashes_equal_values_alike():
    a, b = tiny_config(wd=1), tiny_config(wd=1.0)
    assert json.dumps(a.to_dict(), sort_keys=True) != json.dumps(b.to_dict(), sort_keys=True)  # "1" vs "1.0"
    ca, cb = canonical(a), canonical(b)
    assert json.dumps(ca, sort_keys=True) == json.dumps(cb, sort_keys=True)
    assert type(ca["wd"]) is float and ca == b.to_dict() and set(ca) == {f.name for f in fields(TrainConfig)}
    cm = canonical(MeasureConfig(eps=[1, 2]))
    assert set(cm) == {f.name for f in fields(MeasureConfig)}
    assert (cm["eps"], cm["estimator"], cm["measures"]) == ((1.0, 2.0), "mdlgrok", ("complexity",))


# ---------------------------------------------------------------- flags
def parser_for(cls, **kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_arguments(p, cls, **kw)
    return p


def flags_of(parser: argparse.ArgumentParser) -> dict[str, str]:
    return {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"}


def test_every_field_becomes_a_flag():
    for cls in (TrainConfig, MeasureConfig):
        flags = flags_of(parser_for(cls))
        assert flags == {f.name: "--" + f.name.replace("_", "-") for f in fields(cls)}
    assert "--adam-eps" in flags_of(parser_for(TrainConfig)).values()
    assert "seed" not in flags_of(parser_for(TrainConfig, skip=("seed",)))
    help_text = parser_for(TrainConfig).format_help()
    assert "(default 0.9 0.98)" in help_text and "AdamW epsilon" in help_text


def test_flags_round_trip_into_the_config():
    p = parser_for(TrainConfig)
    args = p.parse_args(
        [
            "--task",
            "mul",
            "--p",
            "11",
            "--betas",
            "0.9",
            "0.99",
            "--adam-eps",
            "1e-7",
            "--wd",
            "0.5",
            "--pos-rows",
            "4",
            "--batch",
            "0",
        ]
    )
    cfg = from_arguments(TrainConfig, args)
    assert cfg == TrainConfig(task="mul", p=11, betas=(0.9, 0.99), adam_eps=1e-7, wd=0.5, pos_rows=4, batch=0)
    assert cfg.betas == (0.9, 0.99) and cfg.adam_eps == 1e-7 and cfg.pos_rows == 4 and cfg.batch == 0
    # flags not given keep the defaults (and the preset's values for wd, gamma, sigma)
    assert from_arguments(TrainConfig, p.parse_args([])) == TrainConfig()
    assert (cfg.lr, cfg.epochs, cfg.seed, cfg.gamma, cfg.sigma) == (1e-3, 10_000, 0, 0.1, 1e-2)
    # extra keyword arguments win over the flags
    assert from_arguments(TrainConfig, args, seed=3, p=7).p == 7
    with pytest.raises(SystemExit):
        p.parse_args(["--betas", "0.9"])  # betas takes exactly two numbers


def test_measure_flags_round_trip():
    p = parser_for(MeasureConfig)
    m = from_arguments(
        MeasureConfig, p.parse_args(["--eps", "1", "0.5", "--measures", "complexity", "norms", "--estimator", "paper"])
    )
    assert m == MeasureConfig(eps=(1.0, 0.5), estimator="paper", measures=("complexity", "norms"))
    assert from_arguments(MeasureConfig, p.parse_args([])) == MeasureConfig()
    with pytest.raises(ValueError, match="unknown estimator"):
        from_arguments(MeasureConfig, p.parse_args(["--estimator", "bayes"]))
