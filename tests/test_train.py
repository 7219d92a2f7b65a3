import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import SINGLE_THREAD, tiny_config

import mdlgrok.training.loop as loop_mod
import mdlgrok.training.single as single_mod
from mdlgrok.config import TrainConfig
from mdlgrok.models import build_model
from mdlgrok.runs import METRIC_COLUMNS, CheckpointError, RunDir, RunExistsError, load_checkpoint
from mdlgrok.tasks import make_dataset
from mdlgrok.training import TrainingFailed, log_epochs, train, train_runs
from mdlgrok.training.objective import cross_entropy, evaluate
from mdlgrok.training.single import SingleEngine

PAPER_POINTS = [
    1,
    2,
    3,
    4,
    6,
    8,
    10,
    13,
    17,
    23,
    30,
    39,
    51,
    66,
    86,
    112,
    146,
    190,
    247,
    321,
    417,
    542,
    705,
    917,
    1192,
    1550,
    2015,
    2619,
    3405,
    4427,
    5756,
    7482,
    9727,
]
METRICS = {"train_loss", "train_acc", "test_loss", "test_acc", "weight_norm", "spectral_entropy", "effective_rank"}


def run(cfg, path, **kw):
    return train(cfg, str(path), progress=False, **kw)


def last_step(path) -> int:
    """The optimizer step count in a run's newest checkpoint."""
    return int(load_checkpoint(RunDir(path).checkpoints()[-1])["step"])


def test_log_epochs_are_the_papers_33_points():
    assert len(PAPER_POINTS) == 33
    assert log_epochs(10_000) == PAPER_POINTS + [10_000]
    assert log_epochs(9727) == PAPER_POINTS
    assert log_epochs(1) == [1]
    assert log_epochs(5) == [1, 2, 3, 4, 5]
    assert log_epochs(20) == [1, 2, 3, 4, 6, 8, 10, 13, 17, 20]


def test_cross_entropy_in_nats_with_probability_floor():
    logits = torch.tensor([[0.0, 0.0], [0.0, 100.0]])
    y = torch.tensor([0, 0])
    # ln 2 for the uniform row; the second row's p(y) = e^-100 is clipped at 1e-9
    assert float(cross_entropy(logits, y)) == pytest.approx((math.log(2) - math.log(1e-9)) / 2, rel=1e-6)
    z = torch.randn(6, 5)
    t = torch.arange(6) % 5
    assert float(cross_entropy(z, t)) == pytest.approx(float(torch.nn.functional.cross_entropy(z, t)), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(epochs=0), "epochs"),
        (dict(lr=0.0), "learning rate"),
        (dict(batch=-1), "batch"),
        (dict(task="mod"), "unknown task"),
        (dict(preset="max"), "preset"),
        (dict(model="rnn"), "unknown model"),
        (dict(attention="x"), "attention"),
        (dict(noise="pink"), "noise"),
    ],
)
def test_train_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kwargs)


def test_train_config_paper_defaults_and_roundtrip():
    cfg = TrainConfig(task="div", p=7)
    assert (cfg.frac, cfg.layers, cfg.lr, cfg.betas, cfg.adam_eps, cfg.epochs) == (
        0.3,
        2,
        1e-3,
        (0.9, 0.98),
        1e-8,
        10_000,
    )
    assert cfg.model_config().vocab == 9
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_train_writes_a_complete_run_folder(tmp_path):
    cfg = tiny_config(epochs=8)
    outcome = run(cfg, tmp_path / "run")
    assert outcome == {"path": str(tmp_path / "run"), "state": "complete", "epoch": 8}
    r = RunDir(tmp_path / "run")
    assert TrainConfig.from_dict(json.loads(r.config.read_text())) == cfg
    env = json.loads(r.env.read_text())
    assert env["torch"] == torch.__version__ and "python" in env and "zstandard" in env
    status = json.loads(r.status.read_text())
    assert status["state"] == "complete" and status["epoch"] == 8

    df = pd.read_parquet(r.metrics)
    # training writes the tidy training columns only; measures go to measures.parquet (the measure stage)
    assert list(df.columns) == METRIC_COLUMNS == ["run_id", "epoch", "step", "metric", "value"]
    assert not r.measures.exists() and not r.payloads.exists()
    assert set(df.metric) == METRICS
    assert (df.run_id == "run").all()
    assert df.epoch.dtype == "int64" and df.step.dtype == "int64" and df.value.dtype == "float64"
    assert sorted(df.epoch.unique()) == log_epochs(8) == [1, 2, 3, 4, 6, 8]
    assert len(df) == len(METRICS) * 6 and not df.duplicated(["epoch", "metric"]).any()
    # 9 training examples, batch min(512, 9 // 2) = 4: batches of 4, 4 and the remainder 1
    assert SingleEngine(cfg).batch == 4
    assert (df.step == 3 * df.epoch).all() and last_step(r.path) == 24
    wide = df.pivot(index="epoch", columns="metric", values="value")
    for m in ("train_acc", "test_acc"):
        assert wide[m].between(0, 1).all()
    assert (wide.weight_norm > 0).all() and (wide.effective_rank >= 1).all()
    assert (wide.spectral_entropy > 0).all() and wide.notna().all().all()
    # every evaluation epoch has a checkpoint
    assert [p.name for p in r.checkpoints()] == [f"epoch_{e:06d}.pt" for e in log_epochs(8)]


def test_checkpoints_load_safely_and_reproduce_recorded_metrics(tmp_path):
    cfg = tiny_config(epochs=6)
    run(cfg, tmp_path / "run")
    r = RunDir(tmp_path / "run")
    df = r.read_metrics()
    data = make_dataset(cfg.task_config())
    for path in r.checkpoints():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert set(ckpt) == set(load_checkpoint(path))
        assert {"model", "optimizer", "rng", "epoch", "step", "config"} <= set(ckpt)
        assert TrainConfig.from_dict(json.loads(ckpt["config"])) == cfg
        model = build_model(cfg.model_config())
        model.load_state_dict(ckpt["model"])
        loss, acc = evaluate(model, data.x_train, data.y_train)
        at = df[df.epoch == ckpt["epoch"]].set_index("metric").value
        assert loss == pytest.approx(at["train_loss"], rel=1e-6)
        assert acc == at["train_acc"]


class Malicious:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_load_checkpoint_never_executes_code(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "epoch_000001.pt"
    torch.save({"model": Malicious(marker)}, path)
    with pytest.raises(CheckpointError, match="epoch_000001.pt"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file really does run code when unpickled unsafely
    assert marker.exists()


def test_same_config_gives_identical_metrics(tmp_path):
    cfg = tiny_config(epochs=6)
    run(cfg, tmp_path / "a" / "run")
    run(cfg, tmp_path / "b" / "run")
    a, b = RunDir(tmp_path / "a" / "run").read_metrics(), RunDir(tmp_path / "b" / "run").read_metrics()
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    run(tiny_config(epochs=6, seed=1), tmp_path / "c" / "run")
    c = RunDir(tmp_path / "c" / "run").read_metrics()
    assert not a.value.equals(c.value)


def test_full_batch_and_mlp(tmp_path):
    cfg = tiny_config(epochs=3, batch=0, model="mlp", noise="uniform")
    assert run(cfg, tmp_path / "run")["state"] == "complete"
    assert SingleEngine(cfg).batch == 9 and last_step(tmp_path / "run") == 3
    assert set(RunDir(tmp_path / "run").read_metrics().metric) == METRICS


def assert_same_runs(a: Path, b: Path):
    """Identical metric tables and identical final weights, optimizer and RNG states."""
    ra, rb = RunDir(a), RunDir(b)
    pd.testing.assert_frame_equal(ra.read_metrics(), rb.read_metrics(), check_exact=True)
    assert [p.name for p in ra.checkpoints()] == [p.name for p in rb.checkpoints()]
    ca, cb = load_checkpoint(ra.checkpoints()[-1]), load_checkpoint(rb.checkpoints()[-1])
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    assert torch.equal(ca["rng"]["noise"], cb["rng"]["noise"])
    assert torch.equal(ca["rng"]["shuffle"], cb["rng"]["shuffle"])
    assert ra.read_status()["state"] == rb.read_status()["state"] == "complete"


def test_resume_with_more_epochs_equals_uninterrupted(tmp_path):
    # "ours": weight noise and the spectral penalty, so the noise RNG and AdamW state must resume exactly
    full = tiny_config(epochs=13)
    run(full, tmp_path / "a" / "run")
    run(tiny_config(epochs=6), tmp_path / "b" / "run")  # 6 is an evaluation epoch of both schedules
    assert RunDir(tmp_path / "b" / "run").read_status()["epoch"] == 6
    run(full, tmp_path / "b" / "run", resume=True)
    assert_same_runs(tmp_path / "a" / "run", tmp_path / "b" / "run")


def test_resume_after_crash_between_rows_and_checkpoint(tmp_path, monkeypatch):
    """Killed after the rows of epoch 6 were written but before its checkpoint: resume drops those rows."""
    cfg = tiny_config(epochs=13)
    run(cfg, tmp_path / "a" / "run")

    real_save, calls = loop_mod.save_checkpoint, []

    def dying_save(path, obj):
        calls.append(path)
        if len(calls) == 5:  # epochs 1, 2, 3, 4 saved; die writing epoch 6
            raise KeyboardInterrupt
        real_save(path, obj)

    monkeypatch.setattr(loop_mod, "save_checkpoint", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "b" / "run")
    monkeypatch.setattr(loop_mod, "save_checkpoint", real_save)
    b = RunDir(tmp_path / "b" / "run")
    assert b.read_status()["state"] == "running"
    assert b.checkpoints()[-1].name == "epoch_000004.pt"
    assert b.read_metrics().epoch.max() == 6  # a row past the last checkpoint

    run(cfg, b.path, resume=True)
    assert_same_runs(tmp_path / "a" / "run", b.path)


def test_resume_refuses_a_different_config(tmp_path):
    run(tiny_config(epochs=2), tmp_path / "run")
    with pytest.raises(ValueError, match="different config.*gamma"):
        run(tiny_config(epochs=4, gamma=0.5), tmp_path / "run", resume=True)
    with pytest.raises(RunExistsError, match="already holds a run"):
        run(tiny_config(epochs=2), tmp_path / "run")


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    cfg = tiny_config(epochs=4)
    run(cfg, tmp_path / "run")
    before = RunDir(tmp_path / "run").read_metrics()
    assert run(cfg, tmp_path / "run", resume=True) == {"path": str(tmp_path / "run"), "state": "complete", "epoch": 4}
    pd.testing.assert_frame_equal(before, RunDir(tmp_path / "run").read_metrics(), check_exact=True)


@pytest.mark.parametrize("preset", ["none", "ours"])
def test_diverging_run_is_marked_failed(tmp_path, preset):
    with pytest.raises(TrainingFailed, match="loss became nan"):
        run(tiny_config(epochs=5, lr=1e30, preset=preset), tmp_path / "run")
    status = RunDir(tmp_path / "run").read_status()
    assert status["state"] == "failed" and "nan" in status["reason"] and status["epoch"] == 1


def test_nan_loss_stops_the_run_and_keeps_earlier_rows(tmp_path, monkeypatch):
    real, steps = single_mod.task_loss, []

    def poisoned(logits, y, kind):
        loss = real(logits, y, kind)
        if torch.is_grad_enabled():  # a training step, not an evaluation
            steps.append(1)
            if len(steps) > 10:  # epoch 4 = steps 10, 11, 12
                return loss * float("nan")
        return loss

    monkeypatch.setattr(single_mod, "task_loss", poisoned)
    with pytest.raises(TrainingFailed):
        run(tiny_config(epochs=8), tmp_path / "run")
    r = RunDir(tmp_path / "run")
    status = r.read_status()
    assert status["state"] == "failed" and status["reason"] == "loss became nan at epoch 4"
    df = r.read_metrics()
    assert sorted(df.epoch.unique()) == [1, 2, 3]
    assert df.value.notna().all()
    assert [p.name for p in r.checkpoints()] == ["epoch_000001.pt", "epoch_000002.pt", "epoch_000003.pt"]


# ---- a real SIGKILL of `python -m mdlgrok train`, then --resume ----


def cli_args(out: Path, p: int, epochs: int, extra: list[str]) -> list[str]:
    return [
        "train",
        "--task",
        "add",
        "--p",
        str(p),
        "--epochs",
        str(epochs),
        "--seed",
        "0",
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def kill_resume_and_compare(
    tmp_path: Path, p: int, epochs: int, extra: list[str], kill_after: int, resume_in_process: bool
):
    """SIGKILL `python -m mdlgrok train` once checkpoint `kill_after` exists, resume it, compare with
    an uninterrupted run (trained in this process meanwhile, on the other core)."""
    from mdlgrok.cli import main

    env = {**os.environ, **SINGLE_THREAD}
    killed = RunDir(tmp_path / "b" / "run")
    victim = subprocess.Popen(
        [sys.executable, "-m", "mdlgrok", *cli_args(killed.path, p, epochs, extra)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )

    def kill_when_due():
        target, deadline = killed.checkpoint_path(kill_after), time.monotonic() + 300
        while not target.exists() and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(victim.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_due)
    killer.start()
    try:
        assert main(cli_args(tmp_path / "a" / "run", p, epochs, extra)) == 0  # the uninterrupted reference
    finally:
        killer.join()
    _, err = victim.communicate()
    assert victim.returncode == -signal.SIGKILL, err.decode()[-2000:]

    assert killed.read_status()["state"] == "running"
    last = killed.checkpoints()[-1]
    assert kill_after <= int(last.stem.split("_")[1]) < epochs  # really mid-way
    for ckpt in killed.checkpoints():  # atomic writes: everything written is readable
        load_checkpoint(ckpt)
    assert killed.read_metrics().epoch.max() >= kill_after

    resume = [*cli_args(killed.path, p, epochs, extra), "--resume"]
    if resume_in_process:
        assert main(resume) == 0
    else:
        done = subprocess.run([sys.executable, "-m", "mdlgrok", *resume], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
    assert_same_runs(tmp_path / "a" / "run", killed.path)


def test_sigkill_then_resume_matches_uninterrupted_fast(tmp_path):
    # weight decay and uniform weight noise, no spectral penalty: fast, still exercises every RNG
    kill_resume_and_compare(
        tmp_path,
        p=7,
        epochs=60,
        kill_after=8,
        resume_in_process=True,
        extra=["--preset", "wd", "--sigma", "0.01", "--noise", "uniform"],
    )


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_paper_preset(tmp_path):
    kill_resume_and_compare(
        tmp_path, p=13, epochs=250, kill_after=66, resume_in_process=False, extra=["--preset", "ours"]
    )


def test_parameters_without_gradient_still_decay():
    """Paper attention, preset wd: query and key get no gradient and only decay, as in optax."""
    engine = SingleEngine(tiny_config(preset="wd", epochs=2))
    q0 = engine.model(0).blocks[0].attn.q.weight.detach().clone()
    engine.train_epoch()
    assert engine.step == 3
    factor = (1 - engine.cfg.lr * engine.cfg.wd) ** engine.step
    assert torch.allclose(engine.model(0).blocks[0].attn.q.weight, q0 * factor, rtol=1e-6, atol=1e-9)


def test_on_checkpoint_sees_each_checkpoint_after_its_rows(tmp_path):
    """The hook (how `train --measure` measures) runs at every evaluation epoch, after that epoch's
    rows and checkpoint were written, with the model as checkpointed."""
    cfg, seen = tiny_config(epochs=4), []

    def hook(run, model, data, epoch, step):
        assert run.checkpoint_path(epoch).exists()
        assert run.read_metrics().epoch.max() == epoch
        ckpt = load_checkpoint(run.checkpoint_path(epoch))
        assert ckpt["step"] == step
        for k, v in model.state_dict().items():
            assert torch.equal(v, ckpt["model"][k]), k
        assert len(data.y_train) == 9
        seen.append((run.run_id, epoch, step))

    run(cfg, tmp_path / "run", on_checkpoint=hook)
    assert seen == [("run", e, 3 * e) for e in log_epochs(4)]


def test_grad_hook_runs_between_backward_and_step():
    engine, calls = SingleEngine(tiny_config(epochs=1)), []

    def hook(eng):
        assert all(p.grad is not None for p in eng.model(0).parameters())
        calls.append(eng.step)  # the step count before the optimizer step

    engine.grad_hook = hook
    assert len(engine.train_epoch()) == 1
    assert calls == [0, 1, 2] and engine.step == 3 and engine.epoch == 1


def test_train_runs_engines_and_their_errors(tmp_path):
    cfgs = [tiny_config(epochs=2), tiny_config(epochs=2, seed=1)]
    with pytest.raises(ValueError, match="single engine trains one model"):
        train_runs(cfgs, [tmp_path / "a", tmp_path / "b"], engine="single")
    with pytest.raises(ValueError, match="unknown engine"):
        train_runs(cfgs[:1], [tmp_path / "a"], engine="turbo")
    out = train_runs(cfgs[:1], [tmp_path / "a"])  # the single engine, resume=True by default
    assert out == [{"path": str(tmp_path / "a"), "state": "complete", "epoch": 2}]
    with pytest.raises(RunExistsError):
        train_runs(cfgs[:1], [tmp_path / "a"], resume=False)
