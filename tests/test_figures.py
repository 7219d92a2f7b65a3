"""Figures and description-length tables are drawn from saved tables only: mdlgrok.analysis
computes (from mdlgrok's estimator rows, at their newest version), mdlgrok.figures draws."""

import math

import pandas as pd
import pytest

from mdlgrok import mdl
from mdlgrok.analysis import (
    EPS_MAIN,
    complexity_summary,
    description_table,
    estimator_rows,
    n_train,
    run_summary,
    summarize,
    with_setting,
)
from mdlgrok.cli import main
from mdlgrok.config import TrainConfig
from mdlgrok.figures import draw_all
from mdlgrok.sweep import run_sweep
from mdlgrok.training import train

TINY = {
    "name": "tiny",
    "measure": {"eps": [1.0, 0.5]},
    "base": {"p": 7, "epochs": 3},
    "grid": {"task": ["add"], "preset": ["ours", "none"], "seed": [0]},
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    table = run_sweep(TINY, root=root, jobs=1, progress=False)
    folder = tmp_path_factory.mktemp("results") / "tiny"
    folder.mkdir()
    table.to_parquet(folder / "table.parquet", index=False)
    return folder


def test_figures_drawn_from_table(results):
    files = draw_all(results.parent)
    names = {f.name for f in files}
    assert {
        "rise_and_fall_add.png",
        "rise_and_fall_add.pdf",
        "final_complexity_vs_eps.png",
        "description_lengths.csv",
        "summary.csv",
        "summary.png",
    } <= names
    assert all(f.stat().st_size > 0 for f in files)
    assert (results / "figure_configs.json").exists()


def test_description_table_matches_mdl(results):
    table = pd.read_parquet(results / "table.parquet")
    desc = description_table(table)
    assert sorted(desc.preset) == ["none", "ours"]
    for _, r in desc.iterrows():
        n = n_train("add", 7, 0.2)
        assert r.n_train == n == math.floor(0.2 * 49)
        assert r.total_bits == pytest.approx(r.model_bits + r.data_bits)
        assert r.occam == pytest.approx(mdl.occam_bound(r.coarse_train_err, r.model_bits, n))
        assert r.truth_table_bits == pytest.approx(49 * math.log2(7))


def test_run_summary_names_settings_and_matches_the_runs(results):
    table = pd.read_parquet(results / "table.parquet")
    summary = run_summary(table)
    assert sorted(summary.setting) == ["none", "ours"]  # the weights the presets imply are not repeated
    desc = description_table(table).set_index("run_id")
    for _, r in summary.iterrows():
        runs = table[table.run_id == r.run_id]
        comp = runs[(runs.metric == "complexity_bits") & (runs.eps == 0.5)].sort_values("epoch")
        assert r.final_bytes == comp.value.iloc[-1] / 8 and r.peak_bytes == comp.value.max() / 8
        assert r.total_bits == desc.total_bits[r.run_id]
        test = runs[runs.metric == "test_acc"].sort_values("epoch")
        assert r.final_test_acc == test.value.iloc[-1]
        hit = test[test.value >= 0.95]
        assert (r.grokking_epoch == hit.epoch.iloc[0]) if len(hit) else math.isnan(r.grokking_epoch)


def test_settings_name_what_varies():
    rows = [
        {"run_id": f"r{g}", "preset": "ours", "attention": "paper", "wd": 1.0, "gamma": g, "sigma": 0.01}
        for g in (0.0, 0.03)
    ]
    assert sorted(with_setting(pd.DataFrame(rows)).setting) == ["gamma=0", "gamma=0.03"]
    rows += [{"run_id": "n", "preset": "none", "attention": "softmax", "wd": 0.0, "gamma": 0.0, "sigma": 0.0}]
    assert sorted(with_setting(pd.DataFrame(rows)).setting) == [
        "none, softmax, gamma=0",
        "ours, paper, gamma=0",
        "ours, paper, gamma=0.03",
    ]
    assert set(with_setting(pd.DataFrame(rows[:1])).setting) == {"all"}


def test_figures_cli_without_tables_fails_cleanly(tmp_path, capsys):
    assert main(["figures", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no tables" in err[0]


def test_figures_only_redraws_the_folders_named(results, tmp_path):
    root = tmp_path / "results"
    for name in ("one", "two"):
        (root / name).mkdir(parents=True)
        (root / name / "table.parquet").write_bytes((results / "table.parquet").read_bytes())
    files = draw_all(root, only=["two"])
    assert files and {f.relative_to(root).parts[0] for f in files} == {"two"}
    assert not (root / "one" / "summary.csv").exists()


def test_figures_cli_only_with_an_unknown_folder_fails_cleanly(results, capsys):
    assert main(["figures", "--results", str(results.parent), "--only", "nonesuch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nonesuch" in err[0] and "tiny" in err[0]


def other_estimators(table):
    """The table with rows no figure should draw: the paper's estimator, and an older version of mdlgrok's."""
    measured = table[table.estimator == "mdlgrok"]
    paper = measured.assign(estimator="paper", value=measured.value * 3)
    older = measured.assign(estimator_version="2", value=measured.value * 5)
    return pd.concat([table, paper, older], ignore_index=True)


def test_analysis_reads_mdlgroks_newest_rows_only(results):
    table = pd.read_parquet(results / "table.parquet")
    assert EPS_MAIN == 0.5 and set(table[table.estimator != ""].estimator) == {"mdlgrok"}
    mixed = other_estimators(table)
    kept = estimator_rows(mixed)
    pd.testing.assert_frame_equal(
        kept.sort_values(list(kept.columns)).reset_index(drop=True),
        table.sort_values(list(table.columns)).reset_index(drop=True),
    )
    paper = estimator_rows(mixed, "paper")
    assert set(paper.estimator) == {"", "paper"} and len(paper) == len(table)
    for run_id, g in table.groupby("run_id"):
        assert complexity_summary(mixed[mixed.run_id == run_id]) == complexity_summary(g)
        assert complexity_summary(g)["estimator_version"] == g[g.estimator == "mdlgrok"].estimator_version.iloc[0]
    pd.testing.assert_frame_equal(description_table(mixed), description_table(table))
    pd.testing.assert_frame_equal(run_summary(mixed), run_summary(table))
    assert complexity_summary(table[table.estimator == ""]) is None  # training rows alone: no complexity


def test_summarize_one_run(results):
    table = pd.read_parquet(results / "table.parquet")
    run_id = sorted(table.run_id.unique())[0]
    text = summarize(table[table.run_id == run_id], {"state": "complete", "wall_s": 1.5}, run_id)
    assert text.splitlines()[0] == f"run {run_id} (complete, 1.5 s)"
    assert "complexity at eps 0.5" in text and "estimator mdlgrok" in text


def test_figures_draw_mdlgroks_rows_even_beside_other_estimators(results, tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    other_estimators(pd.read_parquet(results / "table.parquet")).to_parquet(folder / "table.parquet", index=False)
    draw_all(tmp_path)
    draw_all(results.parent)
    for name in ("summary.csv", "description_lengths.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(folder / name), pd.read_csv(results / name))


def test_sizes_and_digits_tolerances_are_drawn(tmp_path):
    """A subset sweep (from a trained run, as ungrokking) draws everything against D'; a digits
    sweep measured below 0.5 nats is summarized at its largest eps; n_train is the subset."""
    root, parent = tmp_path / "runs", tmp_path / "parent"
    train(TrainConfig(task="add", p=7, epochs=2), parent, progress=False)
    ungrok = {
        "name": "ungrok",
        "measure": {"eps": [0.5]},
        "base": {"p": 7, "epochs": 1, "task": "add", "preset": "ours", "init_from": str(parent)},
        "grid": {"subset": [3, 6], "seed": [0]},
    }
    digits = {
        "name": "dig",
        "measure": {"eps": [0.05, 0.01]},
        "base": {"task": "digits", "model": "dense", "width": 8, "loss": "mse", "epochs": 2, "preset": "wd"},
        "grid": {"init_scale": [1.0, 8.0], "seed": [0]},
    }
    results = tmp_path / "results"
    for spec in (ungrok, digits):
        (results / spec["name"]).mkdir(parents=True)
        run_sweep(spec, root=root, jobs=1, progress=False).to_parquet(results / spec["name"] / "table.parquet")
    names = {f.name for f in draw_all(results)}
    assert "against_subset.png" in names and "rise_and_fall_digits.png" in names
    summary = pd.read_csv(results / "ungrok" / "summary.csv")
    assert sorted(summary.subset) == [3, 6]
    desc = pd.read_csv(results / "ungrok" / "description_lengths.csv")
    assert sorted(desc.n_train) == [3, 6]
    dig = pd.read_csv(results / "dig" / "summary.csv")
    assert sorted(dig.setting) == ["init_scale=1", "init_scale=8"] and dig.final_bytes.notna().all()


def test_a_figure_title_says_how_many_seeds_and_which_estimators_made_it(results):
    from mdlgrok.figures import _provenance

    rows = estimator_rows(pd.read_parquet(results / "table.parquet"))
    version = rows[rows.metric == "complexity_bits"].estimator_version.iloc[0]
    assert _provenance(rows) == f" (1 seed, estimator v{version})"
    later = str(int(version) + 1)
    two = pd.concat(
        [
            rows,
            rows.assign(
                seed=1, estimator_version=lambda d: d.estimator_version.where(d.metric != "complexity_bits", later)
            ),
        ]
    )
    assert _provenance(two) == f" (2 seeds, estimator v{version}, v{later})"


def test_size_figures_tell_presets_by_hue_and_tasks_by_style():
    from mdlgrok.figures import size_roles

    both = pd.DataFrame({"preset": ["ours", "wd", "ours", "wd"], "task": ["add", "add", "mul", "mul"]})
    assert size_roles(both) == ("preset", "task")
    assert size_roles(both[both.task == "add"]) == ("preset", None)
    assert size_roles(both[both.preset == "wd"]) == ("task", None)
    assert size_roles(both.iloc[:1]) == (None, None)
