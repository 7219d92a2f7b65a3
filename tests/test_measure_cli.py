"""The measure stage through the `mdlgrok` command, in-process: train --measure, measure
(in one process and in two, --again, --measures), complexity, summary --plot, and bad input
(status 2, one line). Training writes metrics.parquet; measuring writes measures.parquet."""

import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import snapshot

from mdlgrok.cli import main
from mdlgrok.complexity import VERSION, decode
from mdlgrok.complexity.codecs import CODEC_IDS
from mdlgrok.config import MeasureConfig
from mdlgrok.measures.complexity import options_of
from mdlgrok.runs import MEASURE_COLUMNS, METRIC_COLUMNS, model_from_checkpoint
from mdlgrok.training.objective import evaluate

EPS = [1.0, 0.5]
COMPARED = [
    "complexity_bits",
    "naive_bits",
    "coarse_train_loss",
    "coarse_test_loss",
    "coarse_train_acc",
    "coarse_test_acc",
    "data_bits",
    "codec_bits",
    "loss_evals",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread_workers():
    """One BLAS/OpenMP thread in `measure --jobs 2`'s worker processes too (conftest limits this
    process): two threads per process on a busy 2-core machine make the estimator several times slower."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            mp.setenv(var, "1")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-epoch run of add mod 7 measured as it trains (checkpoints at epochs 1 and 2)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    argv = [
        "train",
        "--task",
        "add",
        "--p",
        "7",
        "--epochs",
        "2",
        "--pos-rows",
        "4",
        "--out",
        str(out),
        "--quiet",
        "--measure",
        "--eps",
        *map(str, EPS),
    ]
    assert main(argv) == 0
    return out


def metrics(run):
    """The training metrics (training writes them, measuring never does)."""
    return pd.read_parquet(run / "metrics.parquet")


def measures(run):
    return pd.read_parquet(run / "measures.parquet")


def complexity_rows(table):
    rows = table[table.metric.isin(COMPARED)]
    return rows.sort_values(["epoch", "eps", "metric", "codec"]).reset_index(drop=True)[
        ["epoch", "metric", "eps", "codec", "estimator", "estimator_version", "options", "value"]
    ]


def payload_file(run, epoch, eps):
    return run / "payloads" / f"epoch_{epoch:06d}_eps_{eps:g}.mdlgrok.bin"


def assert_one_error_line(capsys, *fragments):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("mdlgrok: error: "), lines[0]
    assert "Traceback" not in captured.err + captured.out
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ---------------------------------------------------------------- train --measure
def test_train_measure_writes_complexity_rows(run):
    training = metrics(run)
    assert list(training.columns) == METRIC_COLUMNS
    assert set(training.metric) == {
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "weight_norm",
        "spectral_entropy",
        "effective_rank",
    }  # no measure rows among them
    table = measures(run)
    assert list(table.columns) == MEASURE_COLUMNS
    assert set(table.run_id) == {"run"} and set(table.estimator) == {"mdlgrok"}
    assert set(table.estimator_version) == {VERSION}
    assert set(table.options) == {options_of(MeasureConfig(eps=EPS))}
    c = table[table.metric == "complexity_bits"]
    assert sorted(zip(c.epoch, c.eps)) == [(1, 0.5), (1, 1.0), (2, 0.5), (2, 1.0)]
    assert set(c.step) == set(training.step)
    assert set(c.codec) <= set(CODEC_IDS) and "" not in set(c.codec)
    assert (c.value > 0).all() and (c.value % 8 == 0).all()
    for metric in ("naive_bits", "coarse_train_loss", "coarse_test_acc", "data_bits", "codec_bits", "loss_evals"):
        rows = table[table.metric == metric]
        assert len(rows) >= 4 and rows.eps.notna().all(), metric
    codec_rows = table[table.metric == "codec_bits"]
    assert set(codec_rows.codec) == set(CODEC_IDS)
    for (epoch, eps), group in codec_rows.groupby(["epoch", "eps"]):
        best = c[(c.epoch == epoch) & (c.eps == eps)].value.item()
        assert group.value.min() == best  # the complexity is the shortest codec's payload
    for epoch in (1, 2):
        at = c[c.epoch == epoch].set_index("eps").value
        assert at[1.0] <= at[0.5]  # complexity does not grow with eps


def test_payload_files_decode_into_weights_meeting_the_constraint(run):
    table = measures(run)
    for epoch in (1, 2):
        model, data, ckpt_epoch, _ = model_from_checkpoint(run / "checkpoints" / f"epoch_{epoch:06d}.pt")
        assert ckpt_epoch == epoch
        base = evaluate(model, data.x_train, data.y_train)[0]
        for eps in EPS:
            at = table[(table.epoch == epoch) & (table.eps == eps)].set_index(["metric", "codec"]).value
            payload = payload_file(run, epoch, eps).read_bytes()
            assert 8 * len(payload) == at["complexity_bits"].item()
            model.load_state_dict(decode(payload))
            loss = evaluate(model, data.x_train, data.y_train)[0]
            assert loss == at[("coarse_train_loss", "")]
            assert loss <= base + eps
        info = (run / "payloads" / f"epoch_{epoch:06d}.mdlgrok.json").read_text()
        assert all(name in info for name in CODEC_IDS) and "level" in info


# ---------------------------------------------------------------- measure
def test_measure_in_one_or_two_processes_gives_the_rows_measured_while_training(run, capsys):
    trained_rows = complexity_rows(measures(run))
    n_rows = len(measures(run))
    training = (run / "metrics.parquet").read_bytes()

    # measured already with this config: nothing to do, nothing written
    before = snapshot(run)
    assert main(["measure", str(run), "--quiet", "--eps", *map(str, EPS)]) == 0
    assert f"measured 0 checkpoints of {run}" in capsys.readouterr().out
    assert snapshot(run) == before

    threads = torch.get_num_threads()
    assert main(["measure", str(run), "--jobs", "1", "--quiet", "--again", "--eps", *map(str, EPS)]) == 0
    assert torch.get_num_threads() == threads  # in-process measuring leaves the caller's setting alone
    assert f"measured 2 checkpoints of {run} into {run / 'measures.parquet'}" in capsys.readouterr().out
    one = measures(run)
    pd.testing.assert_frame_equal(complexity_rows(one), trained_rows)
    assert len(one) == n_rows  # rows of the same key replaced, never duplicated
    assert (run / "metrics.parquet").read_bytes() == training  # measuring never touches the training metrics

    assert main(["measure", str(run), "--jobs", "2", "--quiet", "--again", "--eps", *map(str, EPS)]) == 0
    two = measures(run)
    pd.testing.assert_frame_equal(complexity_rows(two), trained_rows)
    assert len(two) == n_rows
    assert (run / "metrics.parquet").read_bytes() == training


def test_another_measure_adds_rows_beside_the_complexity(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = measures(copy)
    assert main(["measure", str(copy), "--measures", "norms", "--quiet"]) == 0
    after = measures(copy)
    norms = after[after.estimator == "norms"]
    assert sorted(norms.metric.unique()) == ["effective_rank", "spectral_entropy", "weight_norm"]
    assert sorted(norms.epoch.unique()) == [1, 2] and norms.eps.isna().all() and (norms.codec == "").all()
    pd.testing.assert_frame_equal(after[after.estimator == "mdlgrok"].reset_index(drop=True), before)
    # the definitions training records: the same values as the training rows of each epoch
    training = metrics(copy).set_index(["epoch", "metric"]).value
    for r in norms.itertuples():
        assert r.value == pytest.approx(training[(r.epoch, r.metric)], rel=1e-5, abs=1e-6), r
    assert snapshot(copy / "payloads") == snapshot(run / "payloads")  # norms write no payloads


# ---------------------------------------------------------------- complexity, summary
def test_complexity_prints_a_report(run, capsys):
    ckpt = run / "checkpoints" / "epoch_000002.pt"
    assert main(["complexity", str(ckpt), "--eps", *map(str, EPS)]) == 0
    out = capsys.readouterr().out
    assert str(ckpt) in out and "epoch 2" in out and "naive size" in out
    for eps in EPS:
        (line,) = [ln for ln in out.splitlines() if ln.split()[:1] == [f"{eps:g}"]]
        size = int(line.split()[1].replace(",", ""))
        assert size == len(payload_file(run, 2, eps).read_bytes())  # the same figure as `measure` (same eps set)
        assert line.split()[2] in CODEC_IDS


def test_complexity_reports_the_accuracy_constrained_description(run, capsys):
    ckpt = run / "checkpoints" / "epoch_000002.pt"
    assert main(["complexity", str(ckpt), "--eps", "0.5", "--accuracy-drop", "0"]) == 0
    out = capsys.readouterr().out
    assert "kl bound" in out
    # columns: constraint, bytes, codec, ratio, coarse loss, train acc, test acc, kl bound
    (line,) = [ln.split() for ln in out.splitlines() if ln.lstrip().startswith("acc>=")]
    assert float(line[5]) >= float(line[0].removeprefix("acc>="))  # the accuracy kept
    assert 0 <= float(line[-1]) <= 1  # the kl bound on the test error


@pytest.mark.parametrize(
    "flags", [["--accuracy-drop", "1"], ["--accuracy-drop", "-0.1"], ["--accuracy-drop", "0", "--estimator", "paper"]]
)
def test_bad_accuracy_drop_for_complexity(run, capsys, flags):
    before = snapshot(run)
    assert main(["complexity", str(run / "checkpoints" / "epoch_000001.pt"), "--eps", "0.5", *flags]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and snapshot(run) == before


def test_summary_draws_the_plot(run, tmp_path, capsys):
    target = tmp_path / "figs" / "X.png"
    assert main(["summary", str(run), "--plot", str(target)]) == 0
    out = capsys.readouterr().out
    assert "complexity at eps 0.5" in out
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and target.stat().st_size > 5000
    assert target.with_suffix(".pdf").exists()


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("eps", ["0", "-1", "nan", "inf"])
def test_bad_eps_for_complexity_and_measure(run, capsys, eps):
    before = snapshot(run)
    assert main(["complexity", str(run / "checkpoints" / "epoch_000001.pt"), "--eps", "0.5", eps]) == 2
    assert_one_error_line(capsys, "eps")
    assert main(["measure", str(run), "--eps", eps, "--quiet"]) == 2
    assert_one_error_line(capsys, "eps")
    assert snapshot(run) == before


@pytest.mark.parametrize("eps", ["0", "-0.5", "nan", "inf"])
def test_bad_eps_for_train_measure_writes_nothing(tmp_path, capsys, eps):
    out = tmp_path / "run"
    argv = ["train", "--p", "7", "--epochs", "1", "--out", str(out), "--quiet", "--measure", "--eps", "1", eps]
    assert main(argv) == 2
    assert_one_error_line(capsys, "eps")
    assert not out.exists()


def test_eps_that_is_not_a_number_is_a_usage_error(run, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["complexity", str(run / "checkpoints" / "epoch_000001.pt"), "--eps", "half"])
    assert exc.value.code == 2
    assert_one_error_line(capsys, "--eps")


def _broken_checkpoints(run, folder):
    real = (run / "checkpoints" / "epoch_000001.pt").read_bytes()
    files = {
        "missing": folder / "missing.pt",
        "empty": folder / "empty.pt",
        "truncated": folder / "truncated.pt",
        "random": folder / "random.pt",
        "foreign": folder / "foreign.pt",
        "folder": folder / "a_folder.pt",
    }
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(real[: len(real) // 2])
    files["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"weights": torch.zeros(3)}, files["foreign"])  # a torch file, not an mdlgrok checkpoint
    files["folder"].mkdir()
    return files


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "random", "foreign", "folder"])
def test_broken_checkpoint_is_one_line_naming_the_file(run, tmp_path, capsys, kind):
    path = _broken_checkpoints(run, tmp_path)[kind]
    assert main(["complexity", str(path), "--eps", "0.5"]) == 2
    assert_one_error_line(capsys, str(path))


@pytest.mark.parametrize("how", [["--again", "--eps", "0.5"], ["--eps", "0.25"]])
def test_broken_checkpoint_inside_a_run_fails_measure_cleanly(run, tmp_path, capsys, how):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "epoch_000001.pt").write_bytes(b"\x00" * 100)
    before = snapshot(copy)
    assert main(["measure", str(copy), "--jobs", "1", "--quiet", *how]) == 2
    assert_one_error_line(capsys, "epoch_000001.pt")
    assert snapshot(copy) == before


def test_measure_a_folder_without_checkpoints(tmp_path, capsys):
    assert main(["measure", str(tmp_path), "--quiet"]) == 2
    assert_one_error_line(capsys, "no checkpoints")


def test_measure_jobs_must_be_positive(run, capsys):
    assert main(["measure", str(run), "--jobs", "0", "--quiet"]) == 2
    assert_one_error_line(capsys, "--jobs")


def test_summary_of_an_empty_folder(tmp_path, capsys):
    assert main(["summary", str(tmp_path)]) == 2
    assert_one_error_line(capsys, "metrics")


def test_nan_is_never_written_as_a_complexity(run):
    table = measures(run)
    c = table[table.metric.isin(["complexity_bits", "naive_bits", "coarse_train_loss"])]
    assert c.value.map(math.isfinite).all()


@pytest.mark.slow
def test_complexity_report_in_paper_mode(run, capsys):
    ckpt = run / "checkpoints" / "epoch_000001.pt"
    assert main(["complexity", str(ckpt), "--eps", "0.5", "--estimator", "paper"]) == 0
    out = capsys.readouterr().out
    assert "estimator paper" in out and "bz2-pickle" in out
