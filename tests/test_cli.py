"""The `mdlgrok` command, in-process: bad input is one line on stderr and status 2, nothing written."""

import json

import pytest
from conftest import snapshot

from mdlgrok.cli import main
from mdlgrok.runs import RunDir


def train_args(out, *extra):
    return ["train", "--task", "add", "--p", "7", "--epochs", "4", "--out", str(out), "--quiet", *extra]


def assert_one_error_line(capsys, *fragments):
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("mdlgrok: error: "), lines[0]
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--task", "pow"], "unknown task 'pow'"),
        (["--p", "2"], "at least 3"),
        (["--p", "-5"], "at least 3"),
        (["--task", "div", "--p", "9"], "prime"),
        (["--frac", "0"], "(0, 1)"),
        (["--frac", "1.5"], "(0, 1)"),
        (["--frac", "1"], "(0, 1)"),
        (["--wd", "-1"], "wd must be non-negative"),
        (["--gamma", "-0.1"], "gamma must be non-negative"),
        (["--sigma", "-0.01"], "sigma must be non-negative"),
        (["--preset", "best"], "unknown preset"),
        (["--model", "cnn"], "unknown model"),
        (["--attention", "linear"], "unknown attention"),
        (["--noise", "pink"], "unknown noise"),
        (["--epochs", "0"], "epochs"),
        (["--lr", "-0.1"], "learning rate"),
        (["--batch", "-2"], "batch"),
        (["--pos-rows", "2"], "4 rows"),
        (["--p", "3", "--frac", "0.1"], "empty"),
        (["--betas", "0.9", "0.98", "--epochs", "0"], "epochs"),
        (["--eps", "1"], "--measure"),  # measure settings without --measure
        (["--estimator", "paper"], "--measure"),
        (["--measures", "norms"], "--measure"),
        (["--measure", "--eps", "1", "-1"], "eps"),
        (["--measure", "--estimator", "magic"], "unknown estimator"),
        (["--measure", "--measures", "colour"], "unknown measure"),
    ],
)
def test_bad_input_is_one_line_status_2_and_writes_nothing(tmp_path, capsys, extra, fragment):
    out = tmp_path / "run"
    assert main(train_args(out, *extra)) == 2
    assert_one_error_line(capsys, fragment)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--p", "seven"],
        ["train", "--frac", "half"],
        ["train", "--bogus-flag"],
        ["train", "--betas", "0.9"],  # two numbers
        ["complexity", "x.pt", "--mode", "paper"],  # the old flag, now --estimator
        ["measure", "somewhere", "--mode", "paper"],
        ["convert"],
        ["fly"],
        [],
    ],
)
def test_malformed_arguments_exit_2_with_one_line(tmp_path, capsys, argv, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv + (["--out", str(tmp_path / "run")] if argv[:1] == ["train"] else []))
    assert exc.value.code == 2
    assert_one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_train_through_main_then_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--task", "add", "--p", "7", "--epochs", "4", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"run complete: {out}"
    # no terminal: one plain progress line per evaluation epoch
    assert [line.split(":")[0] for line in captured.err.splitlines()] == ["epoch 1", "epoch 2", "epoch 3", "epoch 4"]
    run = RunDir(out)
    assert run.read_status()["state"] == "complete"
    cfg = json.loads(run.config.read_text())
    # the paper's defaults for the task: fraction, layers, preset "ours" for add
    assert (cfg["frac"], cfg["layers"], cfg["wd"], cfg["gamma"], cfg["sigma"]) == (0.2, 1, 1.0, 0.1, 0.01)
    assert sorted(run.read_metrics().epoch.unique()) == [1, 2, 3, 4]

    assert main(["train", "--task", "add", "--p", "7", "--epochs", "6", "--out", str(out), "--resume", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # --quiet
    assert sorted(run.read_metrics().epoch.unique()) == [1, 2, 3, 4, 6]
    status = run.read_status()
    assert (status["state"], status["epoch"]) == ("complete", 6)

    # --resume takes the run's own config: only what changes is given
    assert main(["train", "--out", str(out), "--resume", "--epochs", "8", "--quiet"]) == 0
    assert run.read_status()["epoch"] == 8 and json.loads(run.config.read_text())["p"] == 7
    assert main(["train", "--out", str(out), "--resume", "--epochs", "9", "--wd", "0.5", "--quiet"]) == 2
    assert "different config (wd)" in capsys.readouterr().err


def test_overrides_reach_the_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--task",
                "sub",
                "--p",
                "5",
                "--frac",
                "0.5",
                "--model",
                "mlp",
                "--preset",
                "none",
                "--sigma",
                "0.02",
                "--noise",
                "uniform",
                "--batch",
                "0",
                "--lr",
                "0.01",
                "--epochs",
                "2",
                "--seed",
                "3",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    cfg = json.loads((out / "config.json").read_text())
    assert {
        k: cfg[k]
        for k in (
            "task",
            "p",
            "frac",
            "model",
            "layers",
            "preset",
            "wd",
            "gamma",
            "sigma",
            "noise",
            "batch",
            "lr",
            "epochs",
            "seed",
        )
    } == {
        "task": "sub",
        "p": 5,
        "frac": 0.5,
        "model": "mlp",
        "layers": 2,
        "preset": "none",
        "wd": 0.0,
        "gamma": 0.0,
        "sigma": 0.02,
        "noise": "uniform",
        "batch": 0,
        "lr": 0.01,
        "epochs": 2,
        "seed": 3,
    }
    assert (cfg["betas"], cfg["adam_eps"]) == ([0.9, 0.98], 1e-8)  # the paper's AdamW, unless given
    assert "eps" not in cfg and "measure" not in cfg  # measure settings never enter the training config
    assert not (out / "measures.parquet").exists() and not (out / "payloads").exists()


def test_every_train_config_field_has_a_flag_that_reaches_the_config(tmp_path):
    from dataclasses import fields

    from mdlgrok.cli import parser
    from mdlgrok.config import MeasureConfig, TrainConfig
    from mdlgrok.training.single import SingleEngine

    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--task",
                "add",
                "--p",
                "5",
                "--epochs",
                "1",
                "--betas",
                "0.8",
                "0.95",
                "--adam-eps",
                "1e-6",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    cfg = json.loads((out / "config.json").read_text())
    assert set(cfg) == {f.name for f in fields(TrainConfig)}
    assert (cfg["betas"], cfg["adam_eps"]) == ([0.8, 0.95], 1e-6)
    group = SingleEngine(TrainConfig.from_dict(cfg)).opt.param_groups[0]
    assert (group["betas"], group["eps"]) == ((0.8, 0.95), 1e-6)  # they reach the optimizer
    # one flag per field (derived from the dataclass), none given: every field keeps its default
    args = parser().parse_args(["train"])
    assert all(getattr(args, f.name) is None for f in fields(TrainConfig) + fields(MeasureConfig))


@pytest.fixture
def finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(out)) == 0
    capsys.readouterr()
    return out


def test_out_holding_a_run_without_resume(finished_run, capsys):
    before = snapshot(finished_run)
    assert main(train_args(finished_run)) == 2
    assert_one_error_line(capsys, str(finished_run), "--resume")
    assert snapshot(finished_run) == before


def test_resume_with_a_different_config_is_refused(finished_run, capsys):
    before = snapshot(finished_run)
    assert main(train_args(finished_run, "--resume", "--seed", "1")) == 2
    assert_one_error_line(capsys, "different config", "seed")
    assert snapshot(finished_run) == before


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_unreadable_checkpoint_on_resume_names_the_file(finished_run, capsys, damage):
    last = RunDir(finished_run).checkpoints()[-1]
    assert last.name == "epoch_000004.pt"
    data = last.read_bytes()
    last.write_bytes({"truncate": data[:12], "empty": b"", "garbage": b"not a checkpoint " * 40}[damage])
    before = snapshot(finished_run)
    assert main(train_args(finished_run, "--resume")) == 2
    assert_one_error_line(capsys, str(last))
    assert snapshot(finished_run) == before


@pytest.mark.parametrize("text", ['{"task": "add", "p": 7', "[1, 2]", '{"task": "add", "p": 7, "frac": 3}'])
def test_unreadable_config_on_resume_names_the_file(finished_run, capsys, text):
    config = finished_run / "config.json"
    config.write_text(text)
    before = snapshot(finished_run)
    assert main(train_args(finished_run, "--resume")) == 2
    assert_one_error_line(capsys, str(config))
    assert snapshot(finished_run) == before


def test_checkpoint_truncated_mid_archive_names_the_file(finished_run, capsys):
    last = RunDir(finished_run).checkpoints()[-1]
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    assert main(train_args(finished_run, "--resume")) == 2
    assert_one_error_line(capsys, str(last))


def test_diverging_run_exits_1_and_is_marked_failed(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(out, "--lr", "1e30")) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mdlgrok: run failed: ") and "nan" in lines[0]
    assert "Traceback" not in captured.err
    status = RunDir(out).read_status()
    assert status["state"] == "failed" and "nan" in status["reason"]
