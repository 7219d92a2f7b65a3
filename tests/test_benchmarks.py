"""The estimator benchmarks: against the paper's search (its table, its worst ratio, its figure,
on tiny runs of add mod 7), the cost as the model grows (its medians, its flags), and the parts
of the "ours" training step."""

import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import tiny_config

from mdlgrok.figures import draw_estimator
from mdlgrok.training import train

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_estimator  # noqa: E402
import bench_estimator_sizes as sizes  # noqa: E402
import bench_train  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    for seed in (0, 1):
        train(tiny_config(epochs=2, seed=seed), root / f"add-s{seed}", progress=False)
    return root


def bench(monkeypatch, *args) -> int:
    monkeypatch.setattr(sys, "argv", ["bench_estimator.py", *map(str, args)])
    return bench_estimator.main()


def test_several_runs_give_one_table_with_the_worst_ratio(runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.parquet"
    assert bench(monkeypatch, runs / "add-s0", runs / "add-s1", "--epochs", 2, "--eps", 2.0, "--out", out) == 0
    table = pd.read_parquet(out)
    assert set(table.run) == {"add-s0", "add-s1"} and set(table["mode"]) == {"mdlgrok", "paper"}
    assert len(table) == 4 and set(table.epoch) == {2}
    ratios = table.pivot_table(index="run", columns="mode", values="bytes")
    worst = (ratios.mdlgrok / ratios.paper).max()
    assert f"worst ratio mdlgrok/paper: {worst:.3f}" in capsys.readouterr().out
    figures = draw_estimator(out)
    assert all(p.exists() for p in figures)


def test_a_missing_checkpoint_is_one_line_and_status_2(runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.parquet"
    assert bench(monkeypatch, runs / "add-s0", "--epochs", 5, "--out", out) == 2
    assert "lacks checkpoints [5]" in capsys.readouterr().err and not out.exists()


def test_one_search_again_keeps_the_others_rows_of_the_same_checkpoints(runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.parquet"
    assert bench(monkeypatch, runs / "add-s0", runs / "add-s1", "--epochs", 2, "--eps", 2.0, 1.0, "--out", out) == 0
    before = pd.read_parquet(out)
    assert bench(monkeypatch, runs / "add-s0", "--epochs", 2, "--eps", 2.0, "--out", out, "--modes", "mdlgrok") == 0
    after = pd.read_parquet(out)
    assert len(after) == 2 and set(after["mode"]) == {"mdlgrok", "paper"}  # add-s0 at eps 2 only
    paper = after[after["mode"] == "paper"].iloc[0]
    old = before[(before["mode"] == "paper") & (before.run == "add-s0") & (before.eps == 2.0)].iloc[0]
    assert paper.bytes == old.bytes and paper.seconds_all_eps == old.seconds_all_eps  # kept, not rerun


def test_one_search_without_a_table_to_keep_the_other_from_is_status_2(runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "none.parquet"
    assert bench(monkeypatch, runs / "add-s0", "--epochs", 2, "--out", out, "--modes", "mdlgrok") == 2
    assert "give an existing table" in capsys.readouterr().err and not out.exists()


def test_the_sizes_benchmark_reports_medians_of_repeated_estimates(monkeypatch):
    calls = []
    real = sizes.estimate
    monkeypatch.setattr(sizes, "estimate", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, y = sizes.digits(images=False)
    row = sizes.bench("MLP 64-8-8-10", sizes.mlp(8), x[:200], y[:200], [1.0], repeats=2)
    assert len(calls) == 3  # one untimed, two timed
    assert row["parameters"] == 64 * 8 + 8 + 8 * 8 + 8 + 8 * 10 + 10
    assert row["loss_calls"] > 0 and 0 < row["inside_loss_s"] < row["wall_s"]


def test_the_sizes_benchmark_refuses_no_repeats(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_estimator_sizes.py", "--repeats", "0"])
    with pytest.raises(SystemExit) as exit_:
        sizes.main()
    assert exit_.value.code == 2 and "--repeats must be at least 1" in capsys.readouterr().err


def test_the_training_benchmark_times_each_part_of_the_ours_step():
    parts = bench_train.ours_parts(steps=1)
    assert list(parts) == [
        "spectral penalty, value and gradient",
        "  of which eigh of its 9 Gram matrices (float64)",  # embedding, positions, q, k, v, o, 2 MLP, readout
        "noise, drawn, added and removed",
    ]
    assert all(ms > 0 for ms in parts.values())
