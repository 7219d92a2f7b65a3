"""Sweeps: experiment files expand into validated, stably keyed runs; a sweep skips complete
runs, resumes interrupted ones, gives the same table in one process or two, and gathers
every run with its config columns; the `mdlgrok sweep` command in-process."""

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import snapshot

import mdlgrok.measure as measure_mod
import mdlgrok.training.loop as loop_mod
from mdlgrok import sweep
from mdlgrok.cli import main
from mdlgrok.config import CONFIG_COLUMNS, PAPER_EPS, MeasureConfig, TrainConfig
from mdlgrok.measure import missing_checkpoints
from mdlgrok.runs import RunDir, config_of
from mdlgrok.sweep import executors, expand, gather, load_experiment, run_key, run_sweep, stages
from mdlgrok.sweep.gather import convert_table
from mdlgrok.sweep.plan import stack_groups
from mdlgrok.training import train

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def tiny(name="tiny", grid=None, epochs=3, measure=None, **base):
    """add mod 7 with a 4-row positional table: each run trains in a fraction of a second.
    measure: the experiment's [measure] table (None: its runs are not measured)."""
    exp = {
        "name": name,
        "base": {"task": "add", "p": 7, "pos_rows": 4, **base},
        "grid": grid if grid is not None else {"seed": [0, 1], "preset": ["ours", "none"]},
        "lengths": {"cpu": epochs, "paper": epochs + 1},
    }
    return exp if measure is None else {**exp, "measure": measure}


def sorted_table(df):
    return df.sort_values(["run_id", "epoch", "metric", "eps", "codec", "estimator"]).reset_index(drop=True)


def outcome_states(table):
    return sorted(o["state"] for o in table.attrs["outcomes"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 4-run tiny grid, uninterrupted, in one process."""
    root = tmp_path_factory.mktemp("reference")
    table = run_sweep(tiny(epochs=4), root, jobs=1, progress=False)
    assert outcome_states(table) == ["complete"] * 4
    return root, table


# ---------------------------------------------------------------- expansion
def test_expand_counts_lengths_and_dedup():
    exp = {
        "name": "g",
        "base": {"p": 7},
        "grid": {"seed": [0, 1, 2], "preset": ["ours", "none"], "task": ["add", "mul"]},
        "lengths": {"cpu": 5, "paper": 9},
    }
    cfgs = expand(exp)
    assert len(cfgs) == 12 and all(isinstance(c, TrainConfig) for c in cfgs)
    assert {c.epochs for c in cfgs} == {5} and {c.epochs for c in expand(exp, "paper")} == {9}
    assert {(c.task, c.preset, c.seed) for c in cfgs} == {
        (t, pr, s) for t in ("add", "mul") for pr in ("ours", "none") for s in (0, 1, 2)
    }
    # [[grid]] is a union; gamma 0.1 at wd 1, sigma 1e-2 *is* "ours" for add, so it runs once
    union = {
        "name": "u",
        "base": {"p": 7, "task": "add", "epochs": 2},
        "grid": [
            {"preset": ["none", "wd", "ours"]},
            {"preset": ["ours"], "wd": [1], "sigma": [1e-2], "gamma": [0, 0.1, 0.3]},
        ],
    }
    cfgs = expand(union)
    assert len(cfgs) == 5
    assert sorted((c.wd, c.gamma, c.sigma) for c in cfgs) == [
        (0.0, 0.0, 0.0),
        (1.0, 0.0, 0.0),
        (1.0, 0.0, 0.01),
        (1.0, 0.1, 0.01),
        (1.0, 0.3, 0.01),
    ]
    assert len(expand({"name": "one", "base": {"p": 7, "epochs": 2}})) == 1  # no grid: the base run


@pytest.mark.parametrize(
    "change,fragment",
    [
        ({"grid": {"seeds": [0]}}, "unknown TrainConfig field 'seeds'"),
        ({"base": {"p": 7, "colour": "red"}}, "unknown TrainConfig field 'colour'"),
        ({"base": {"p": 2}}, "at least 3"),
        ({"grid": {"preset": ["ours", "best"]}}, "unknown preset"),
        ({"grid": {"seed": ["0"]}}, "seed must be an integer"),
        ({"grid": {"seed": 0}}, "non-empty list"),
        ({"grid": {"seed": []}}, "non-empty list"),
        ({"base": {"p": 7, "eps": [1.0]}}, "'eps'; it is a measure setting: put it in [measure]"),
        ({"base": {"p": 7, "measure": True}}, "'measure'; it is a measure setting: put it in [measure]"),
        ({"grid": {"eps": [[1.0]]}}, "put it in [measure]"),
        ({"measure": {"eps": [1, -1]}}, "eps"),
        ({"measure": {"eps": []}}, "eps"),
        ({"measure": {"eps": 1}}, "eps must be a list of numbers"),
        ({"measure": {"estimator": "magic"}}, "unknown estimator 'magic'"),
        ({"measure": {"measures": ["colour"]}}, "unknown measure(s) colour"),
        ({"measure": {"colour": 1}}, "unknown MeasureConfig field 'colour'"),
        ({"measure": 3}, "measure must be true or a [measure] table"),
        ({"base": {"p": 7, "epochs": 3}}, "either in [lengths]"),
        ({"lengths": {"cpu": 0}}, "positive number of epochs"),
        ({"name": "../up"}, "folder name"),
        ({"seeds": [1]}, "unknown top-level key"),
    ],
)
def test_expand_rejects_bad_experiments(change, fragment):
    with pytest.raises(ValueError) as err:
        expand({**tiny(), **change})
    assert fragment in str(err.value)


def test_unknown_length_is_rejected():
    with pytest.raises(ValueError, match="unknown length 'huge'"):
        expand(tiny(), "huge")
    with pytest.raises(ValueError, match="no \\[lengths\\]"):
        expand({"name": "x", "base": {"p": 7}}, "cpu")


# the other measures each paper-figure experiment takes beside complexity, side by side
BESIDE = {"rise_and_fall": ("llc", "fourier"), "unregularized": ("fourier",)}
EPS = {"attention": (0.5,)}  # the headline eps alone: its paper-attention runs are rise_and_fall's


def test_experiment_files_expand():
    counts = {
        "rise_and_fall": 12,
        "four_tasks": 12,
        "regularizers": 9,
        "gamma": 15,
        "attention": 24,
        "unregularized": 4,
    }
    files = sorted(EXPERIMENTS.glob("*.toml"))
    assert {f.stem for f in files} >= set(counts)
    for f in files:
        exp = load_experiment(f)
        assert exp.name == f.stem
        cpu = expand(f)
        assert all(c.p == 113 for c in cpu if c.task != "digits"), f
        if "paper" in exp.lengths:  # the modular experiments; digits have no paper length
            assert {c.epochs for c in expand(f, "paper")} == {10_000}, f
        assert exp.measure is not None and exp.measure.estimator == "mdlgrok", f  # every experiment measures
        if f.stem in counts:  # the paper's figures: 600 epochs on CPU, the paper's seven eps (but EPS)
            assert len(cpu) == counts[f.stem], f
            assert {c.epochs for c in cpu} == {600}, f
            beside = BESIDE.get(f.stem, ())
            eps = EPS.get(f.stem, PAPER_EPS)
            assert exp.measure == MeasureConfig(eps=eps, estimator="mdlgrok", measures=("complexity", *beside)), f
    # the runs other experiments link from rise_and_fall have its keys (the same resolved configs)
    keys = {name: {run_key(c) for c in expand(EXPERIMENTS / f"{name}.toml")} for name in counts}
    assert len(keys["regularizers"] & keys["rise_and_fall"]) == 6 and len(keys["gamma"] & keys["rise_and_fall"]) == 3
    assert len(keys["attention"] & keys["rise_and_fall"]) == 12 and len(keys["four_tasks"] & keys["rise_and_fall"]) == 6
    assert len(keys["unregularized"] & keys["rise_and_fall"]) == 2  # add and mul with "none", seed 0
    assert {(c.task, c.layers, c.preset) for c in expand(EXPERIMENTS / "unregularized.toml")} == {
        ("add", 1, "none"),
        ("sub", 2, "none"),
        ("mul", 1, "none"),
        ("div", 2, "none"),
    }
    four = expand(EXPERIMENTS / "four_tasks.toml")
    assert {(c.task, c.layers, c.frac, c.sigma) for c in four} == {
        ("add", 1, 0.2, 1e-2),
        ("sub", 2, 0.3, 1e-3),
        ("mul", 1, 0.2, 1e-2),
        ("div", 2, 0.3, 1e-3),
    }


# ---------------------------------------------------------------- keys
def test_keys_are_stable_readable_and_distinct():
    cfg = TrainConfig(task="add", p=7, preset="ours", seed=0, epochs=3)
    key = run_key(cfg)
    assert key.startswith("add-ours-s0-") and len(key.rsplit("-", 1)[1]) == 12
    # the same resolved config however it was written: ints for floats, lists for tuples, a round trip
    assert (
        run_key(TrainConfig(task="add", p=7, preset="ours", seed=0, epochs=3, wd=1, gamma=0.1, betas=[0.9, 0.98]))
        == key
    )
    assert run_key(TrainConfig.from_dict(cfg.to_dict())) == key
    assert run_key(TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))) == key  # config.json
    # what is measured never enters the key: with or without [measure], any eps or estimator
    plain = [run_key(c) for c in expand(tiny())]
    for measure in (True, {"eps": [1.0]}, {"eps": [0.5, 2], "estimator": "paper", "measures": ["complexity", "norms"]}):
        assert [run_key(c) for c in expand(tiny(measure=measure))] == plain
    with pytest.raises(TypeError):
        TrainConfig(task="add", p=7, eps=list(PAPER_EPS))  # no longer a training field
    # every field that changes the weights changes the key, the AdamW settings too
    for change in ({"betas": (0.9, 0.99)}, {"adam_eps": 1e-6}, {"lr": 2e-3}, {"batch": 0}, {"noise": "uniform"}):
        assert run_key(TrainConfig(task="add", p=7, preset="ours", seed=0, epochs=3, **change)) != key, change
    assert run_key(TrainConfig(task="add", p=7, preset="ours", seed=0, epochs=4)) != key
    assert run_key(TrainConfig(task="add", p=7, preset="ours", gamma=0.0, epochs=3)).startswith("add-ours-g0-s0-")
    assert run_key(TrainConfig(task="add", p=7, attention="softmax", epochs=3)).startswith("add-ours-softmax-s0-")
    for f in EXPERIMENTS.glob("*.toml"):
        keys = [run_key(c) for c in expand(f)]
        assert len(set(keys)) == len(keys)
        assert keys == [run_key(c) for c in expand(f)]


# ---------------------------------------------------------------- running
def test_sweep_runs_everything_and_gathers_config_columns(reference):
    root, table = reference
    folder = root / "tiny"
    assert list(table.columns[: 1 + len(CONFIG_COLUMNS)]) == ["run_id", *CONFIG_COLUMNS]
    assert {"epoch", "step", "metric", "value", "eps", "codec"} <= set(table.columns)
    assert table.run_id.nunique() == 4 and set(table.epoch) == {1, 2, 3, 4}
    for run_id, rows in table.groupby("run_id"):
        cfg = TrainConfig.from_dict(json.loads((folder / run_id / "config.json").read_text()))
        assert run_id == run_key(cfg)
        for col in CONFIG_COLUMNS:
            assert rows[col].nunique() == 1 and rows[col].iloc[0] == getattr(cfg, col), (run_id, col)
    assert set(table.preset) == {"ours", "none"} and set(table.seed) == {0, 1}
    pd.testing.assert_frame_equal(pd.read_parquet(folder / "table.parquet"), table)
    pd.testing.assert_frame_equal(gather(folder), table)  # the same, read from the folder alone


def test_a_second_sweep_does_no_work(reference, tmp_path):
    root, _ = reference
    folder = root / "tiny"
    before = {k: v for k, v in snapshot(folder).items() if k != "table.parquet"}
    mtimes = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file() and p.name != "table.parquet"}
    table = run_sweep(tiny(epochs=4), root, jobs=2, progress=False)
    assert outcome_states(table) == ["skipped"] * 4
    assert {k: v for k, v in snapshot(folder).items() if k != "table.parquet"} == before
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_runs_complete_in_another_experiment_are_linked_not_trained(reference, tmp_path, capsys):
    ref_root, expected = reference
    root = tmp_path / "runs"
    shutil.copytree(ref_root / "tiny", root / "tiny", symlinks=True)
    other = tiny(name="other", grid={"seed": [0, 2], "preset": ["ours"]}, epochs=4)
    text = (
        'name = "other"\n[base]\ntask = "add"\np = 7\npos_rows = 4\n[grid]\nseed = [0, 2]\npreset = ["ours"]\n'
        "[lengths]\ncpu = 4\n"
    )
    assert main(["sweep", str(write_experiment(tmp_path / "other.toml", text)), "--root", str(root), "--dry-run"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert "link (tiny)" in shown[0] and " new " in shown[1]
    table = run_sweep(other, root, jobs=1, progress=False)
    linked = [r for r in sweep.plan(other, root) if r.path.is_symlink()]
    assert [r.cfg.seed for r in linked] == [0] and linked[0].path.resolve() == (root / "tiny" / linked[0].key).resolve()
    assert outcome_states(table) == ["complete", "skipped"]  # seed 2 trained, seed 0 linked
    mine = table[table.run_id == linked[0].key]
    ref = expected[expected.run_id == linked[0].key]
    pd.testing.assert_frame_equal(sorted_table(mine), sorted_table(ref[mine.columns]))
    # --no-share trains it in this experiment's own folder instead
    table = run_sweep(
        tiny(name="own", grid={"seed": [0], "preset": ["ours"]}, epochs=4), root, jobs=1, progress=False, share=False
    )
    assert outcome_states(table) == ["complete"] and not any(p.is_symlink() for p in (root / "own").iterdir())


def test_interrupted_sweep_finishes_only_missing_runs_and_equals_uninterrupted(reference, tmp_path, monkeypatch):
    _, expected = reference
    # 1. a sub-grid first: seed 0 only (2 of the 4 runs)
    sub = tiny(epochs=4, grid={"seed": [0], "preset": ["ours", "none"]})
    assert outcome_states(run_sweep(sub, tmp_path, progress=False)) == ["complete"] * 2
    # 2. the full grid, killed while writing the 3rd checkpoint of its first new run
    real, saves = loop_mod.save_checkpoint, []

    def dying_save(path, obj):
        saves.append(path)
        if len(saves) == 3:
            raise KeyboardInterrupt
        real(path, obj)

    monkeypatch.setattr(loop_mod, "save_checkpoint", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(tiny(epochs=4), tmp_path, progress=False)
    monkeypatch.setattr(loop_mod, "save_checkpoint", real)
    states = sorted(r.state for r in sweep.plan(tiny(epochs=4), tmp_path))
    assert states == ["complete", "complete", "new", "partial"]
    # 3. started again: only the missing runs run, the partial one from its checkpoint at epoch 2
    table = run_sweep(tiny(epochs=4), tmp_path, progress=False)
    outcomes = table.attrs["outcomes"]
    assert sorted(o["state"] for o in outcomes) == ["complete", "complete", "skipped", "skipped"]
    assert sorted(o.get("resumed_from", 0) for o in outcomes if o["state"] == "complete") == [0, 2]
    pd.testing.assert_frame_equal(sorted_table(table), sorted_table(expected), check_exact=True)


def test_two_processes_equal_one_and_a_failed_run_does_not_stop_the_others(reference, tmp_path, capsys):
    _, expected = reference
    exp = tiny(epochs=4)
    exp["grid"] = [exp["grid"], {"lr": [1e30], "seed": [0]}]  # plus a run that diverges at epoch 1
    table = run_sweep(exp, tmp_path, jobs=2, threads=1)  # one thread each, as this process (conftest)
    outcomes = table.attrs["outcomes"]
    assert outcome_states(table) == ["complete"] * 4 + ["failed"]
    assert {o["threads"] for o in outcomes} == {1}
    failed = [o for o in outcomes if o["state"] == "failed"][0]
    assert "loss became nan" in failed["reason"]
    assert RunDir(failed["path"]).read_status()["state"] == "failed"
    err = capsys.readouterr().err
    assert err.count("complete at epoch 4") == 4 and err.count("FAILED") == 1
    pd.testing.assert_frame_equal(sorted_table(table), sorted_table(expected), check_exact=True)
    # started again, the failed run is not retried (its divergence is deterministic)
    again = run_sweep(exp, tmp_path, jobs=2, progress=False)
    assert outcome_states(again) == ["skipped"] * 5


def test_threads_per_worker_fill_the_cores_once(monkeypatch):
    monkeypatch.setattr(measure_mod, "available_cores", lambda: 16)
    assert [measure_mod.threads_per_worker(j) for j in (1, 2, 3, 16, 32)] == [16, 8, 5, 1, 1]
    assert executors.threads_per_worker is measure_mod.threads_per_worker  # one count for sweeps and measuring


def test_gather_adds_the_fields_that_vary(tmp_path):
    table = run_sweep(tiny(epochs=2, grid={"lr": [1e-3, 2e-3]}), tmp_path, progress=False)
    assert "lr" in table.columns and set(table.lr) == {1e-3, 2e-3}
    assert table.groupby("run_id").lr.nunique().eq(1).all()
    assert "noise" not in table.columns  # the same for every run


def test_measured_sweep_gathers_complexity_rows(tmp_path, capsys):
    from mdlgrok.complexity import VERSION
    from mdlgrok.measures.complexity import options_of

    exp = tiny(epochs=1, grid={"seed": [0]}, measure={"eps": [1]}, pos_rows=None)  # every field in the table
    table = run_sweep(exp, tmp_path)
    (outcome,) = table.attrs["outcomes"]
    assert outcome["state"] == "complete" and outcome["measured"] == 1  # trained, then measured in the same task
    assert "complete at epoch 1, measured 1 checkpoints" in capsys.readouterr().err
    bits = table[table.metric == "complexity_bits"]
    assert len(bits) == 1 and set(bits.eps) == {1.0} and (bits.value > 0).all()
    assert set(bits.estimator) == {"mdlgrok"} and (bits.codec != "").all()
    assert set(bits.estimator_version) == {VERSION} and set(bits.options) == {options_of(MeasureConfig(eps=[1]))}
    training = table[table.estimator == ""]
    assert training.eps.isna().all() and (training.codec == "").all() and (training.estimator_version == "").all()
    run = RunDir(tmp_path / "tiny" / table.run_id.iloc[0])
    assert run.payloads.is_dir() and not missing_checkpoints(run, MeasureConfig(eps=[1]))
    assert "eps" not in json.loads(run.config.read_text())
    # the measured table is the unmeasured one plus the measure rows
    plain = run_sweep(tiny(epochs=1, grid={"seed": [0]}, pos_rows=None), tmp_path / "plain", progress=False)
    pd.testing.assert_frame_equal(sorted_table(training), sorted_table(plain), check_exact=True)
    # an older table (no estimator_version or options, other run keys) converted: this one again
    old_id = older_key(run.run_id, config_of(json.loads(run.config.read_text())), (1.0,))
    old = table.drop(columns=["estimator_version", "options"]).assign(run_id=old_id)
    converted = convert_table(old, versions={old_id: VERSION}, options={old_id: options_of(MeasureConfig(eps=[1]))})
    pd.testing.assert_frame_equal(converted, table)
    assert convert_table(table) is table  # the current layout is left alone
    unknown = convert_table(old)
    assert set(unknown[unknown.estimator != ""].estimator_version) == {"unknown"}
    assert set(unknown[unknown.estimator == ""].estimator_version) == {""}


def test_sweep_measures_a_complete_run_whose_measuring_stopped(tmp_path, capsys):
    """A run trained to the end whose measuring was stopped part-way (rows for some checkpoints,
    none for others) is measured by the next sweep, without training again."""
    exp = tiny(epochs=2, grid={"seed": [0]}, measure={"eps": [1]})
    table = run_sweep(exp, tmp_path, progress=False)
    run = RunDir(tmp_path / "tiny" / table.run_id.iloc[0])
    full = run.read_measures()
    last = full.epoch.max()
    full[full.epoch != last].to_parquet(run.measures, index=False)  # the last checkpoint unmeasured
    capsys.readouterr()
    again = run_sweep(exp, tmp_path)
    err = capsys.readouterr().err
    assert "1 complete run with checkpoints never measured: measuring" in err and "complete at epoch" not in err
    assert "measured 1 checkpoints" in err  # the missing one alone
    assert outcome_states(again) == ["skipped"]
    assert not missing_checkpoints(run, MeasureConfig(eps=[1]))
    untimed = [sorted_table(t[t.metric != "estimator_seconds"]) for t in (again, table)]  # wall times differ
    pd.testing.assert_frame_equal(*untimed)
    capsys.readouterr()
    run_sweep(exp, tmp_path)  # nothing left to measure
    assert "never measured" not in capsys.readouterr().err


def older_key(key: str, cfg, eps: tuple, measure: bool = True) -> str:
    """The key an older version gave this config: its hash covered the training fields of its
    time plus the measure settings `measure` and `eps`."""
    from mdlgrok.config import canonical
    from mdlgrok.sweep.gather import OLDER_FIELDS

    d = {k: v for k, v in canonical(cfg).items() if k in OLDER_FIELDS}
    text = json.dumps({**d, "measure": measure, "eps": list(eps)}, sort_keys=True, separators=(",", ":"))
    return key.rsplit("-", 1)[0] + "-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def test_converting_an_older_table_never_gives_a_run_another_configs_key(reference):
    """convert_table rebuilds each run's config from the table's columns: a field that is not a
    column (pos_rows = 4 here, the same for every run) must not silently yield another config's key;
    it refuses. With every field in the columns it gives back the current keys."""
    root, table = reference
    cfgs = {r: config_of(json.loads((root / "tiny" / r / "config.json").read_text())) for r in table.run_id.unique()}
    assert {c.pos_rows for c in cfgs.values()} == {4}
    old = table.drop(columns=["estimator_version", "options"])
    old = old.assign(run_id=old.run_id.map(lambda r: older_key(r, cfgs[r], PAPER_EPS)))
    with pytest.raises(ValueError, match="do not give back"):
        convert_table(old)
    with_pos = old.assign(pos_rows=4)
    converted = convert_table(with_pos)
    assert sorted(converted.run_id.unique()) == sorted(table.run_id.unique())


def assert_close_tables(got, want):
    got, want = sorted_table(got), sorted_table(want)
    pd.testing.assert_frame_equal(got.drop(columns="value"), want.drop(columns="value"))
    np.testing.assert_allclose(got.value, want.value, rtol=1e-4, atol=1e-5)  # tolerances of test_stacked


def test_stacked_sweep_equals_separate_runs_and_is_skipped_when_done(reference, tmp_path, capsys):
    _, expected = reference
    exp = tiny(epochs=4)
    exp["grid"] = [exp["grid"], {"lr": [1e30], "seed": [0]}]  # plus a run that diverges at epoch 1
    table = run_sweep(exp, tmp_path, stack="on", device="cpu", stack_size=3)
    assert outcome_states(table) == ["complete"] * 4 + ["failed"]
    assert sorted(o["stacked"] for o in table.attrs["outcomes"]) == [2, 2, 3, 3, 3]  # 5 runs, stacks of 3 and 2
    err = capsys.readouterr().err
    assert "as 2 stacks on cpu: 3, 2 runs" in err and err.count("(stack of") == 4 and err.count("FAILED") == 1
    assert_close_tables(table, expected)
    assert outcome_states(run_sweep(exp, tmp_path, stack="on", device="cpu", progress=False)) == ["skipped"] * 5


def test_stack_groups_share_fields_and_resume_epoch(tmp_path):
    exp = tiny(epochs=2, grid={"seed": [0, 1, 2], "frac": [0.5, 0.6]})
    runs = sweep.plan(exp, tmp_path)
    assert sorted(len(g) for g in stack_groups(runs, 64)) == [3, 3]  # frac changes the split sizes
    assert sorted(len(g) for g in stack_groups(runs, 2)) == [1, 1, 2, 2]
    train(runs[0].cfg, str(runs[0].path), progress=False)  # one run ahead of its group
    groups = stack_groups(runs, 64)
    assert sorted(len(g) for g in groups) == [1, 2, 3] and [runs[0]] in groups
    with pytest.raises(ValueError, match="at least 1"):
        stack_groups(runs, 0)


def test_measured_stacked_sweep_measures_as_its_own_stage(tmp_path):
    exp = tiny(epochs=1, grid={"seed": [0, 1]}, measure={"eps": [1]})
    table = run_sweep(exp, tmp_path, stack="on", device="cpu", progress=False)
    bits = table[table.metric == "complexity_bits"]
    assert outcome_states(table) == ["complete", "complete"]
    assert bits.groupby("run_id").size().tolist() == [1, 1] and (bits.value > 0).all()
    for run_id in table.run_id.unique():
        assert not missing_checkpoints(RunDir(tmp_path / "tiny" / run_id), MeasureConfig(eps=[1]))


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--stack", "off", "--device", "cuda"], "GPU"),
        (["--device", "tpu"], "unknown device"),
        (["--stack", "on", "--stack-size", "0"], "at least 1"),
    ],
)
def test_bad_stack_options_are_one_line_status_2(tmp_path, capsys, monkeypatch, args, fragment):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    f = write_experiment(tmp_path / "cli.toml", TINY_TOML)
    assert main(["sweep", str(f), "--root", str(tmp_path / "runs"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]


# ---------------------------------------------------------------- the command
def write_experiment(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TINY_TOML = """
name = "cli"
[base]
task = "add"
p = 7
pos_rows = 4
[grid]
seed = [0, 1]
[lengths]
cpu = 2
paper = 3
"""


def test_cli_sweep_and_dry_run(tmp_path, capsys):
    f = write_experiment(tmp_path / "cli.toml", TINY_TOML)
    root = tmp_path / "runs"
    assert main(["sweep", str(f), "--root", str(root), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and all(" new " in line and "epochs=2" in line for line in out[:2])
    assert out[-1].endswith("0 complete, 0 partial, 2 new, 0 failed")
    assert not root.exists()  # a dry run writes nothing
    assert main(["sweep", str(f), "--root", str(root), "--quiet"]) == 0
    assert "2 runs" in capsys.readouterr().out
    assert (root / "cli" / "table.parquet").is_file()
    assert main(["sweep", str(f), "--root", str(root), "--dry-run", "--length", "paper"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("2 new, 0 failed")  # another length, other keys
    assert main(["sweep", str(f), "--root", str(root), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert all(" complete " in line for line in out[:2]) and "2 complete" in out[-1]


def test_cli_sweep_failed_run_exits_1(tmp_path, capsys):
    f = write_experiment(tmp_path / "bad_lr.toml", TINY_TOML.replace("seed = [0, 1]", "lr = [1e30]"))
    assert main(["sweep", str(f), "--root", str(tmp_path / "runs")]) == 1
    assert "FAILED" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text,args,fragment",
    [
        (None, [], "does not exist"),
        ("name = 'x'\n[base\np = 7", [], "not valid TOML"),
        (TINY_TOML.replace("pos_rows = 4", "pos_row = 4"), [], "unknown TrainConfig field 'pos_row'"),
        (TINY_TOML.replace("p = 7", "p = 2"), [], "at least 3"),
        (TINY_TOML.replace("seed = [0, 1]", "seed = 0"), [], "non-empty list"),
        (TINY_TOML, ["--length", "huge"], "unknown length"),
        (TINY_TOML, ["--jobs", "0"], "--jobs"),
    ],
)
def test_cli_sweep_bad_input_is_one_line_status_2(tmp_path, capsys, text, args, fragment):
    f = tmp_path / "exp.toml"
    if text is not None:
        write_experiment(f, text)
    root = tmp_path / "runs"
    assert main(["sweep", str(f), "--root", str(root), *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mdlgrok: error: ") and fragment in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not root.exists()


# ---------------------------------------------------------------- executors and the measuring stage
def test_submitit_local_executor_gives_the_local_table(tmp_path):
    """A 2 x 3 grid (seeds x gamma) through the local executor and through submitit's LocalExecutor."""
    pytest.importorskip("submitit")
    exp = tiny(name="grid", epochs=2, grid={"seed": [0, 1], "gamma": [0.0, 0.1, 0.3]})
    local = run_sweep(exp, tmp_path / "local", progress=False, threads=1)
    table = run_sweep(exp, tmp_path / "submitit", executor="submitit-local", jobs=2, threads=1, progress=False)
    outcomes = table.attrs["outcomes"]
    assert outcome_states(table) == ["complete"] * 6 and {o["threads"] for o in outcomes} == {1}
    assert table.run_id.nunique() == 6 and set(table.gamma) == {0.0, 0.1, 0.3} and set(table.seed) == {0, 1}
    pd.testing.assert_frame_equal(sorted_table(table), sorted_table(local), check_exact=True)
    folder = tmp_path / "submitit" / "grid"
    assert (folder / ".submitit").is_dir()  # submitit's pickles and logs, which gather ignores
    pd.testing.assert_frame_equal(gather(folder), table)
    # started again, nothing is submitted
    assert (
        outcome_states(run_sweep(exp, tmp_path / "submitit", executor="submitit-local", progress=False))
        == ["skipped"] * 6
    )


def test_submitit_jobs_are_requeued_with_the_same_call():
    """On a Slurm timeout or preemption submitit resubmits checkpoint()'s call: the same run, which resumes."""
    pytest.importorskip("submitit")
    task = executors.Resumable(stages.train_one)
    again = task.checkpoint({"p": 7}, "runs/x/key", 1)
    assert again.function is task and again.args == ({"p": 7}, "runs/x/key", 1)


STAGE_TOML = TINY_TOML.replace('name = "cli"', 'name = "stage"').replace("seed = [0, 1]", "seed = [0]")


def test_measure_only_stage_equals_measuring_in_the_sweep(tmp_path, capsys, monkeypatch):
    from mdlgrok.complexity.payload import decode
    from mdlgrok.runs import model_from_checkpoint

    f = write_experiment(tmp_path / "stage.toml", STAGE_TOML)  # no [measure]: trained, not measured
    root = tmp_path / "runs"
    cfg = MeasureConfig(eps=[1.0])
    assert main(["sweep", str(f), "--root", str(root), "--quiet"]) == 0
    run = sweep.plan(load_experiment(f), root)[0]
    assert len(missing_checkpoints(RunDir(run.path), cfg)) == 2 and not RunDir(run.path).measures.exists()
    assert main(["sweep", str(f), "--root", str(root), "--measure-only", "--eps", "1.0"]) == 0
    assert "measured 2 checkpoints" in capsys.readouterr().err
    assert missing_checkpoints(RunDir(run.path), cfg) == []
    table = pd.read_parquet(root / "stage" / "table.parquet")
    # the same run measured by the sweep itself ([measure] in the experiment): the same rows, but for timing
    measured = tiny(name="stage", epochs=2, grid={"seed": [0]}, measure={"eps": [1.0]})
    trained = run_sweep(measured, tmp_path / "measured", progress=False)
    assert [r.key for r in sweep.plan(measured, tmp_path / "measured")] == [run.key]  # [measure] is not in the key

    def complexity(df):  # the estimator's rows (training rows have no estimator), but for its timing
        return sorted_table(df[(df.estimator != "") & (df.metric != "estimator_seconds")])

    got, want = complexity(table), complexity(trained)
    assert set(got.metric) >= {"complexity_bits", "naive_bits", "codec_bits", "description_bits"}
    bits = got[got.metric == "complexity_bits"]
    assert sorted(zip(bits.epoch, bits.eps)) == [(1, 1.0), (2, 1.0)]
    pd.testing.assert_frame_equal(got, want)
    # the payloads decode to the checkpoint's tensors, and their sizes are the bits in the table
    payloads = run.path / "payloads"
    info = json.loads((payloads / "epoch_000002.mdlgrok.json").read_text())["results"]
    model, *_ = model_from_checkpoint(run.path / "checkpoints" / "epoch_000002.pt")
    for r in info:
        state = decode((payloads / r["file"]).read_bytes())
        assert set(state) <= set(model.state_dict()) and all(
            state[k].shape == model.state_dict()[k].shape for k in state
        )
        assert r["bits"] == bits[(bits.epoch == 2) & (bits.eps == r["eps"])].value.item()
    # measured already: a second stage does nothing; --again measures every complete run again
    # (measure_run replaces rows of the same key, so rows are never duplicated)
    n = len(table)
    before = snapshot(run.path)
    assert main(["sweep", str(f), "--root", str(root), "--measure-only", "--quiet", "--eps", "1.0"]) == 0
    assert len(pd.read_parquet(root / "stage" / "table.parquet")) == n and snapshot(run.path) == before
    assert main(["sweep", str(f), "--root", str(root), "--measure-only", "--again", "--eps", "1.0"]) == 0
    assert "measured 2 checkpoints" in capsys.readouterr().err
    again_table = pd.read_parquet(root / "stage" / "table.parquet")
    assert len(again_table) == n
    pd.testing.assert_frame_equal(complexity(again_table), got)
    calls = []
    monkeypatch.setattr(
        stages,
        "measure_one",
        lambda path, measure, again, threads: (
            calls.append((path, measure, again))
            or {"key": Path(path).name, "path": path, "state": "measured", "checkpoints": 2, "seconds": 0.0}
        ),
    )
    again = sweep.measure_sweep(f, root, again=True, measure=cfg, progress=False)
    assert calls == [(str(run.path), cfg.to_dict(), True)] and outcome_states(again) == ["measured"]
    assert len(again) == n
    # without a measure config, the experiment's [measure] (here none: the defaults, the paper's eps)
    calls.clear()
    sweep.measure_sweep(f, root, progress=False)
    assert calls == [(str(run.path), MeasureConfig().to_dict(), False)]


def test_measure_only_leaves_runs_that_are_not_complete(tmp_path):
    exp = tiny(name="part", epochs=2, grid={"seed": [0]}, measure={"eps": [1.0]})
    table = sweep.measure_sweep(exp, tmp_path, progress=False)  # nothing trained yet
    assert outcome_states(table) == ["skipped"] and table.attrs["outcomes"][0]["was"] == "new" and len(table) == 0


@pytest.mark.parametrize(
    "args",
    [["--executor", "submitit-local"], ["--executor", "slurm"], ["--executor", "submitit-local", "--measure-only"]],
)
def test_missing_submitit_is_one_line_status_2(tmp_path, capsys, monkeypatch, args):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    f = write_experiment(tmp_path / "cli.toml", TINY_TOML)
    root = tmp_path / "runs"
    assert main(["sweep", str(f), "--root", str(root), *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "need submitit" in lines[0] and "pip install" in lines[0], captured.err
    assert not root.exists()
    with pytest.raises(executors.ExecutorUnavailable, match="pip install"):
        run_sweep(tiny(), root, executor="submitit-local", progress=False)


def test_slurm_without_slurm_and_bad_slurm_options_are_status_2(tmp_path, capsys, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setattr(executors.shutil, "which", lambda name: None)
    f = write_experiment(tmp_path / "cli.toml", TINY_TOML)
    assert main(["sweep", str(f), "--root", str(tmp_path / "runs"), "--executor", "slurm"]) == 2
    assert "no Slurm here" in capsys.readouterr().err
    assert main(["sweep", str(f), "--root", str(tmp_path / "runs"), "--slurm-time", "0"]) == 2
    assert "--slurm-time" in capsys.readouterr().err
    for args in (["--again"], ["--eps", "1"], ["--estimator", "paper"]):  # measure options go with --measure-only
        assert main(["sweep", str(f), "--root", str(tmp_path / "runs"), *args]) == 2
        assert "--measure-only" in capsys.readouterr().err
    assert main(["sweep", str(f), "--root", str(tmp_path / "runs"), "--measure-only", "--eps", "0"]) == 2
    assert "eps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # the old flag, now --again
        main(["sweep", str(f), "--root", str(tmp_path / "runs"), "--measure-only", "--remeasure"])
    assert exc.value.code == 2 and "--remeasure" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_an_option_switched_on_stays_a_column_even_when_every_run_shares_it():
    from mdlgrok.runs import MEASURE_COLUMNS
    from mdlgrok.sweep.gather import with_configs

    rows = pd.DataFrame({"run_id": ["a", "b"], "epoch": [1, 1], "metric": ["x", "x"], "value": [0.0, 1.0]})
    configs = [{"run_id": k, **TrainConfig(subset=400, seed=s).to_dict()} for k, s in (("a", 0), ("b", 1))]
    table = with_configs(rows.reindex(columns=MEASURE_COLUMNS), configs)
    assert (table.subset == 400).all()  # the same D' for all: still a column (analysis reads n from it)
    assert "init_scale" not in table and "lr" not in table  # off, or unchanged, options stay out


def test_each_ungrokking_seed_starts_from_the_grokfast_run_of_its_seed():
    parents = {
        run_key(c): c
        for c in expand(EXPERIMENTS / "grokfast.toml")
        if c.preset == "wd" and c.grad_filter == "none" and c.lr == 1e-3
    }
    children = expand(EXPERIMENTS / "ungrokking.toml")
    assert {c.seed for c in children} == {0, 1, 2}
    for c in children:
        parent = parents[Path(c.init_from).name]
        assert parent.seed == c.seed and Path(c.init_from).parent.name == "grokfast"
