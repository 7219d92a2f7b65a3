"""Analysis of tidy tables on constructed curves with known answers."""

import math

import numpy as np
import pandas as pd
import pytest

from mdlgrok.analysis import estimator_rows, literature_checks, measure_curves, scaled, tracking_table, turn_epoch

EPOCHS = np.array([1, 10, 50, 100, 200, 300, 400, 600])
CURVES = {
    "complexity_bits": [1, 5, 9, 10, 8, 3, 2, 2],  # peaks at 100, half way down (6) first at 300
    "gini_embed": [0, 0, 0, 0.1, 0.3, 0.8, 0.9, 0.9],  # rises with test accuracy, half way up at 300
    "test_acc": [0, 0, 0.05, 0.1, 0.5, 0.9, 1, 1],  # half way up at 200
    "train_acc": [1.0] * 8,
}


def _table(curves=CURVES, run_id="r") -> pd.DataFrame:
    rows = []
    for metric, values in curves.items():
        measured = metric == "complexity_bits"
        for epoch, value in zip(EPOCHS, values):
            rows.append(
                {
                    "run_id": run_id,
                    "epoch": int(epoch),
                    "metric": metric,
                    "value": float(value),
                    "eps": 0.5 if measured else math.nan,
                    "estimator": "mdlgrok" if measured else "",
                    "estimator_version": "3" if measured else "",
                }
            )
    return pd.DataFrame(rows)


def test_turn_epochs_of_a_fall_and_a_rise():
    e = pd.Series(EPOCHS)
    assert turn_epoch(e, pd.Series(CURVES["complexity_bits"]), rising=False) == 300
    assert turn_epoch(e, pd.Series(CURVES["gini_embed"]), rising=True) == 300
    assert math.isnan(turn_epoch(e, pd.Series([1.0, 2, 3, 4, 5, 6, 7, 8]), rising=False))  # never falls


def test_tracking_table_times_each_measure_against_test_accuracy():
    table = pd.concat([_table(), _table(run_id="s")])
    out = tracking_table(measure_curves(table)).set_index("measure")
    assert out.loc["complexity_bits", "median_lead_epochs"] == -100  # falls 100 epochs after accuracy rises
    assert out.loc["gini_embed", "median_lead_epochs"] == -100
    assert out.loc["gini_embed", "spearman_test_acc"] > 0.9
    assert out.loc["complexity_bits", "runs_timed"] == 2


def test_scaled_curves_span_zero_to_one():
    long = scaled(measure_curves(_table()))
    for measure, g in long.groupby("measure"):
        if g.value.nunique() > 1:
            assert g.scaled.min() == 0 and g.scaled.max() == pytest.approx(1.0), measure


def test_estimator_rows_keep_the_newest_version_of_each_run():
    old = _table().assign(estimator_version=lambda d: d.estimator_version.replace("3", "2"))
    both = pd.concat([old.assign(value=old.value * 2), _table()])
    mine = estimator_rows(both)
    assert set(mine[mine.estimator == "mdlgrok"].estimator_version) == {"3"}
    assert len(mine[mine.estimator == ""]) == len(_table()[_table().estimator == ""]) * 2


def test_paper_numbers_read_the_curve_at_the_papers_epochs():
    from mdlgrok.analysis import paper_numbers

    epochs = [1, 86, 917, 2015, 9727, 10000]
    bits = [8e3, 800e3, 300e3, 240e3, 200e3, 190e3]
    acc = [0.0, 0.1, 0.99, 1.0, 1.0, 1.0]
    rows = [
        {
            "run_id": "r",
            "epoch": e,
            "metric": "complexity_bits",
            "value": b,
            "eps": 0.5,
            "estimator": "mdlgrok",
            "estimator_version": "3",
        }
        for e, b in zip(epochs, bits)
    ]
    rows += [
        {
            "run_id": "r",
            "epoch": e,
            "metric": "naive_bits",
            "value": 8e6,
            "eps": 0.5,
            "estimator": "mdlgrok",
            "estimator_version": "3",
        }
        for e in epochs
    ]
    rows += [
        {
            "run_id": "r",
            "epoch": e,
            "metric": "test_acc",
            "value": a,
            "eps": math.nan,
            "estimator": "",
            "estimator_version": "",
        }
        for e, a in zip(epochs, acc)
    ]
    table = pd.DataFrame(rows).assign(task="add", preset="ours", seed=0)
    out = paper_numbers(table).iloc[0]
    assert (out.peak_bytes, out.peak_epoch) == (100e3, 86)
    assert (out.bytes_at_917, out.bytes_at_2015, out.bytes_at_9727) == (37.5e3, 30e3, 25e3)
    assert out.grokking_epoch == 917 and out.final_bytes == 190e3 / 8
    assert out.naive_over_final == pytest.approx(8e6 / 190e3)
    assert (out.task, out.preset, out.seed) == ("add", "ours", 0)


def test_literature_checks_read_the_shapes_off_the_curves():
    curves = {
        **CURVES,
        "train_acc": [0.1, 0.5, 0.995, 1, 1, 1, 1, 1],  # memorized at epoch 50
        "llc": [5, 40, 90, 70, 30, 20, 15, 15],  # peaks at 50, ends at 15
        "excluded_loss": [4, 3, 0.2, 0.3, 1, 3, 4, 4],
        "restricted_loss": [5, 5, 5, 4, 2, 0.5, 0.1, 0.1],
    }
    (row,) = literature_checks(measure_curves(_table(curves))).to_dict("records")
    assert (row["memorized_epoch"], row["llc_peak_epoch"], row["llc_peak"], row["llc_final"]) == (50, 50, 90, 15)
    assert row["grokked_epoch"] == 400  # test acc first >= 0.95
    assert (row["gini_embed_memorized"], row["gini_embed_final"]) == (0, 0.9)
    assert (row["excluded_loss_memorized"], row["excluded_loss_final"]) == (0.2, 4)
    assert (row["restricted_loss_memorized"], row["restricted_loss_final"]) == (5, 0.1)


def test_literature_checks_of_a_run_that_never_memorizes_are_nan():
    (row,) = literature_checks(measure_curves(_table({**CURVES, "train_acc": [0.5] * 8}))).to_dict("records")
    assert math.isnan(row["memorized_epoch"]) and math.isnan(row["gini_embed_memorized"])
    assert row["gini_embed_final"] == 0.9 and "llc_peak" not in row
