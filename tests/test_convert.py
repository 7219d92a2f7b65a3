"""Older run folders: measure settings in config.json and measure rows inside metrics.parquet.

runs.convert_run moves them to the current layout (measures.parquet, a config without `measure`
and `eps`); until then training refuses to resume such a folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from conftest import snapshot, tiny_config

import mdlgrok.runs as runs_mod
from mdlgrok.cli import main
from mdlgrok.config import TrainConfig
from mdlgrok.runs import MEASURE_COLUMNS, METRIC_COLUMNS, RunDir, config_of, convert_run, is_legacy, load_checkpoint
from mdlgrok.training import log_epochs, train

OLD_COLUMNS = ["run_id", "epoch", "step", "metric", "value", "eps", "codec", "estimator"]  # results.COLUMNS before


def old_measure_rows(run_id: str, epochs: list[int]) -> list[dict]:
    """What the older `train --measure` appended to metrics.parquet at eps 0.5 (estimator mdlgrok)."""
    rows = []
    for e in epochs:
        common = {"run_id": run_id, "epoch": e, "step": 3 * e, "eps": 0.5, "estimator": "mdlgrok"}
        rows += [
            {**common, "metric": "complexity_bits", "value": 100.0 + e, "codec": "zstd"},
            {**common, "metric": "naive_bits", "value": 900.0 + e, "codec": ""},
            {**common, "metric": "codec_bits", "value": 120.0 + e, "codec": "lzma"},
        ]
    return rows


def make_legacy_run(path: Path, epochs: int = 4) -> tuple[TrainConfig, pd.DataFrame, pd.DataFrame]:
    """A run folder in the older layout, by hand: a tiny run, its config given `measure` and `eps`,
    its metrics.parquet given eps/codec/estimator columns and measure rows at two epochs.
    Returns the config, the training rows as trained and the measure rows added."""
    cfg = tiny_config(epochs=epochs)
    train(cfg, path, progress=False)
    run = RunDir(path)
    trained = run.read_metrics()
    old_config = {**json.loads(run.config.read_text()), "measure": True, "eps": [0.5]}
    run.config.write_text(json.dumps(old_config, indent=2, sort_keys=True) + "\n")
    measured = pd.DataFrame(old_measure_rows(run.run_id, [2, epochs]), columns=OLD_COLUMNS)
    training = trained.assign(eps=math.nan, codec="", estimator="")[OLD_COLUMNS]
    # each epoch's measure rows after its training rows, as the older `train --measure` wrote them
    legacy = pd.concat([training, measured], ignore_index=True).sort_values("epoch", kind="stable")
    legacy = legacy.astype({"epoch": "int64", "step": "int64", "value": "float64", "eps": "float64"})
    legacy.to_parquet(run.metrics, index=False)
    return cfg, trained, measured


def test_a_legacy_folder_is_recognized_and_not_resumed(tmp_path):
    path = tmp_path / "old"
    cfg, _, _ = make_legacy_run(path)
    run = RunDir(path)
    assert is_legacy(run)
    before = snapshot(path)
    with pytest.raises(ValueError, match="mdlgrok convert"):
        train(tiny_config(epochs=8), path, resume=True, progress=False)
    with pytest.raises(ValueError, match="mdlgrok convert"):
        train(cfg, path, resume=True, progress=False)
    assert snapshot(path) == before  # refused before touching anything
    # a current folder is not legacy; older configs still yield their TrainConfig through config_of
    train(cfg, tmp_path / "new", progress=False)
    assert not is_legacy(RunDir(tmp_path / "new"))
    assert config_of(json.loads(run.config.read_text())) == cfg


def test_either_half_of_the_old_layout_counts_as_legacy(tmp_path):
    path = tmp_path / "old"
    make_legacy_run(path)
    run = RunDir(path)
    config = json.loads(run.config.read_text())
    legacy_metrics = pd.read_parquet(run.metrics)
    run.config.write_text(json.dumps({k: v for k, v in config.items() if k not in ("measure", "eps")}))
    assert is_legacy(run)  # measure rows in metrics.parquet
    legacy_metrics[legacy_metrics.eps.isna()][METRIC_COLUMNS].to_parquet(run.metrics, index=False)
    assert not is_legacy(run)
    run.config.write_text(json.dumps({**config, "measure": False}))
    assert is_legacy(run)  # measure settings in config.json


def test_convert_run_moves_the_measure_rows(tmp_path):
    path = tmp_path / "old"
    cfg, trained, measured = make_legacy_run(path)
    run = RunDir(path)
    checkpoints = snapshot(run.ckpt_dir)

    assert convert_run(path, estimator_version="0.2.0") is True
    assert not is_legacy(run)
    # metrics.parquet: exactly the training rows, in the training columns
    metrics = pd.read_parquet(run.metrics)
    assert list(metrics.columns) == METRIC_COLUMNS
    key = ["epoch", "metric"]
    pd.testing.assert_frame_equal(
        metrics.sort_values(key).reset_index(drop=True),
        trained.sort_values(key).reset_index(drop=True),
        check_exact=True,
    )
    # measures.parquet: exactly the measure rows, labelled with the version given and empty options
    measures = pd.read_parquet(run.measures)
    assert list(measures.columns) == MEASURE_COLUMNS
    assert len(measures) == len(measured) == 6
    assert (measures.estimator_version == "0.2.0").all() and (measures.options == "{}").all()
    assert (measures.estimator == "mdlgrok").all() and (measures.eps == 0.5).all()
    got = measures[OLD_COLUMNS].sort_values(key).reset_index(drop=True)
    want = measured.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_exact=True, check_dtype=False)
    # read_all puts them back together
    assert len(run.read_all()) == len(trained) + len(measured)
    # config.json: the legacy fields dropped, the rest as trained; checkpoints untouched
    assert json.loads(run.config.read_text()) == json.loads(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_dict(json.loads(run.config.read_text())) == cfg
    assert snapshot(run.ckpt_dir) == checkpoints

    after = snapshot(path)
    assert convert_run(path, estimator_version="0.3.0") is False  # nothing left to convert
    assert snapshot(path) == after


def test_converted_run_resumes_with_more_epochs(tmp_path):
    path = tmp_path / "old"
    make_legacy_run(path, epochs=4)
    convert_run(path)
    run = RunDir(path)
    measures = snapshot(path)["measures.parquet"]

    outcome = train(tiny_config(epochs=8), path, resume=True, progress=False)
    assert outcome == {"path": str(path), "state": "complete", "epoch": 8}
    assert run.read_status()["state"] == "complete"
    assert [p.name for p in run.checkpoints()] == [f"epoch_{e:06d}.pt" for e in log_epochs(8)]
    assert load_checkpoint(run.checkpoints()[-1])["step"] == 24
    assert snapshot(path)["measures.parquet"] == measures  # training never writes the measures
    # the resumed run equals one trained for 8 epochs straight
    train(tiny_config(epochs=8), tmp_path / "straight", progress=False)
    straight = RunDir(tmp_path / "straight").read_metrics().drop(columns="run_id")
    pd.testing.assert_frame_equal(run.read_metrics().drop(columns="run_id"), straight, check_exact=True)


def test_convert_moves_rows_that_name_an_estimator_but_no_eps(tmp_path):
    path = tmp_path / "old"
    make_legacy_run(path)
    run = RunDir(path)
    legacy = pd.read_parquet(run.metrics)
    extra = pd.DataFrame(
        [
            {
                "run_id": "old",
                "epoch": 4,
                "step": 12,
                "metric": "loss_evals",
                "value": 7.0,
                "eps": math.nan,
                "codec": "",
                "estimator": "paper",
            }
        ],
        columns=OLD_COLUMNS,
    )
    pd.concat([legacy, extra], ignore_index=True).to_parquet(run.metrics, index=False)
    assert convert_run(path, options='{"search": "bayes"}')
    measures = run.read_measures()
    assert len(measures) == 7 and (measures.estimator_version == "unknown").all()
    assert (measures.options == '{"search": "bayes"}').all()
    paper = measures[measures.estimator == "paper"]
    assert paper.metric.tolist() == ["loss_evals"] and paper.eps.isna().all()
    assert "loss_evals" not in set(run.read_metrics().metric)


def test_convert_run_errors_and_the_command(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        convert_run(tmp_path)
    make_legacy_run(tmp_path / "old")
    assert main(["convert", str(tmp_path / "old"), "--estimator-version", "0.2.1"]) == 0
    assert f"converted {tmp_path / 'old'}" in capsys.readouterr().out
    run = RunDir(tmp_path / "old")
    assert not is_legacy(run) and (run.read_measures().estimator_version == "0.2.1").all()
    assert main(["convert", str(tmp_path / "old")]) == 0
    assert "nothing to convert" in capsys.readouterr().out


def test_convert_run_interrupted_then_repeated_moves_each_row_once(tmp_path, monkeypatch):
    path = tmp_path / "old"
    _, _, measured = make_legacy_run(path)
    real, calls = runs_mod.write_table, []

    def dying(target, df):  # dies after measures.parquet, before metrics.parquet is rewritten
        calls.append(target)
        if Path(target).name == "metrics.parquet":
            raise KeyboardInterrupt
        real(target, df)

    monkeypatch.setattr(runs_mod, "write_table", dying)
    with pytest.raises(KeyboardInterrupt):
        convert_run(path)
    monkeypatch.setattr(runs_mod, "write_table", real)
    assert RunDir(path).measures.exists() and is_legacy(RunDir(path))
    assert convert_run(path)  # "converting again after an interruption finishes the job"
    assert len(RunDir(path).read_measures()) == len(measured)
