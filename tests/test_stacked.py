"""Stacked training equals separate single-engine runs (CPU, float tolerance).

Tolerances: metrics rtol 1e-4 / atol 1e-5. The two computations do the same float32 math in a
different order (batched matmuls under vmap, a batched eigvalsh), so single gradients agree to
~1e-7. Adam turns those rounding differences into larger parameter differences where a gradient
is itself at the rounding level: its first steps move each weight by lr * g / (|g| + eps), so
g = 3.6e-8 against 4.3e-8 (a true zero, rounded two ways) moves a weight by 0.78 lr against
0.81 lr. Final weights are therefore compared with atol 1e-4 (0.1 lr); the metrics, sums over
many weights, stay within 1e-4 relative.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_config

import mdlgrok.training.loop as loop_mod
from mdlgrok.config import TrainConfig
from mdlgrok.models import build_model
from mdlgrok.regularizers import mean_spectral_entropy
from mdlgrok.runs import RunDir, load_checkpoint, model_from_checkpoint
from mdlgrok.training import log_epochs, train, train_runs
from mdlgrok.training.objective import model_metrics
from mdlgrok.training.single import SingleEngine
from mdlgrok.training.stacked import StackedAdamW, StackedEngine, can_stack, check_stackable

EPOCHS = 5
RTOL, ATOL = 1e-4, 1e-5
WEIGHT_ATOL = 1e-4


def configs() -> list[TrainConfig]:
    return [
        tiny_config(seed=0, epochs=EPOCHS),
        tiny_config(seed=1, epochs=EPOCHS),
        # different weights, no penalty (its q/k projections then get no gradient at all),
        # uniform noise, its own lr and betas
        tiny_config(seed=2, epochs=EPOCHS, wd=0.3, gamma=0.0, sigma=0.05, noise="uniform", lr=3e-3, betas=(0.8, 0.95)),
    ]


def separate(cfg: TrainConfig) -> tuple[dict[int, dict[str, float]], SingleEngine]:
    """The metrics of a single engine at the evaluation epochs, and the engine after the last epoch."""
    engine = SingleEngine(cfg)
    metrics = {}
    for _ in range(cfg.epochs):
        engine.train_epoch()
        if engine.epoch in log_epochs(cfg.epochs):
            metrics[engine.epoch] = engine.metrics()[0]
    return metrics, engine


def stacked(cfgs: list[TrainConfig], tmp_path, **kw) -> tuple[list[dict], list[RunDir]]:
    """train_runs(engine="stacked") into fresh folders under tmp_path: the outcomes and the folders."""
    runs = [RunDir(tmp_path / f"stack{i}-seed{c.seed}") for i, c in enumerate(cfgs)]
    return train_runs(cfgs, [r.path for r in runs], engine="stacked", **kw), runs


def test_stacked_equals_separate_runs(tmp_path):
    cfgs = configs()
    outcomes, runs = stacked(cfgs, tmp_path)
    assert [o["state"] for o in outcomes] == ["complete"] * 3
    for i, cfg in enumerate(cfgs):
        expected, engine = separate(cfg)
        df = runs[i].read_metrics()
        assert sorted(df.epoch.unique()) == log_epochs(EPOCHS)
        assert (df.step == df.epoch * engine.step // engine.epoch).all()  # 3 batches per epoch
        for epoch, metrics in expected.items():
            got = df[df.epoch == epoch].set_index("metric").value
            assert set(got.index) == set(metrics)
            for name, value in metrics.items():
                assert got[name] == pytest.approx(value, rel=RTOL, abs=ATOL), (i, epoch, name)
        final, _, epoch, step = model_from_checkpoint(runs[i].checkpoints()[-1])
        assert (epoch, step) == (engine.epoch, engine.step)
        for (name, p), q in zip(engine.model(0).named_parameters(), final.parameters()):
            torch.testing.assert_close(q, p.detach(), rtol=0, atol=WEIGHT_ATOL, msg=f"model {i} {name}")


def test_stacked_adamw_matches_torch():
    """Per-model lr, betas, eps and weight decay on stacked tensors = torch.optim.AdamW per model."""
    settings = [
        {"lr": 1e-3, "betas": (0.9, 0.98), "eps": 1e-8, "weight_decay": 1.0},
        {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1},
    ]
    torch.manual_seed(0)
    shapes = [(5, 3), (7,), (2, 3, 4)]
    inits = [[torch.randn(s) for s in shapes] for _ in settings]
    refs = [[p.clone().requires_grad_(True) for p in init] for init in inits]
    opts = [torch.optim.AdamW(ref, **kw) for ref, kw in zip(refs, settings)]
    stacked = {str(j): torch.stack([init[j] for init in inits]).requires_grad_(True) for j in range(len(shapes))}
    ours = StackedAdamW(
        stacked,
        [s["lr"] for s in settings],
        [s["betas"] for s in settings],
        [s["eps"] for s in settings],
        [s["weight_decay"] for s in settings],
    )
    for _ in range(6):
        grads = [[torch.randn(s) * 10 ** float(torch.randint(-4, 1, ())) for s in shapes] for _ in settings]
        for ref, opt, g in zip(refs, opts, grads):
            for p, gp in zip(ref, g):
                p.grad = gp.clone()
            opt.step()
        for j in range(len(shapes)):
            stacked[str(j)].grad = torch.stack([g[j] for g in grads])
        ours.step()
    for i, ref in enumerate(refs):
        for j, p in enumerate(ref):
            # bit-identical on this machine's CPU; a tolerance in case another CPU vectorizes differently
            torch.testing.assert_close(stacked[str(j)][i], p.detach(), rtol=1e-6, atol=1e-7)


def test_stacked_spectral_entropy_matches_per_model():
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(build_model(tiny_config().model_config()))
    params, _ = torch.func.stack_module_state(models)
    got = mean_spectral_entropy(params.values(), batch_dims=1)
    assert got.shape == (3,)
    want = torch.stack([mean_spectral_entropy(m) for m in models]).detach()
    torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-6)


def test_diverged_model_does_not_disturb_the_others(tmp_path, monkeypatch):
    cfgs = [tiny_config(seed=0, epochs=2), tiny_config(seed=1, epochs=2)]
    real_make = loop_mod.make_engine

    def poisoned(*args, **kw):  # the stack as train_runs builds it, model 1's readout NaN from the start
        eng = real_make(*args, **kw)
        with torch.no_grad():
            eng.params["readout.weight"][1].fill_(float("nan"))
        return eng

    monkeypatch.setattr(loop_mod, "make_engine", poisoned)
    outcomes, runs = stacked(cfgs, tmp_path)
    assert outcomes[0] == {"path": str(runs[0].path), "state": "complete", "epoch": 2}
    assert outcomes[1]["state"] == "failed" and "loss became nan" in outcomes[1]["reason"]
    status = runs[1].read_status()
    assert status["state"] == "failed" and "loss became nan" in status["reason"] and status["epoch"] == 1
    assert runs[1].read_metrics().empty and not runs[1].checkpoints()
    expected, _ = separate(cfgs[0])
    df = runs[0].read_metrics()
    got = df[df.epoch == 2].set_index("metric").value
    for name, value in expected[2].items():
        assert got[name] == pytest.approx(value, rel=RTOL, abs=ATOL), name


def test_can_stack_and_its_errors():
    base = tiny_config()
    assert can_stack([base, tiny_config(seed=3, wd=0.1, gamma=0.0, sigma=0.0, lr=1e-2)])
    check_stackable([base, tiny_config(seed=3, noise="uniform")])
    for other, field in [
        (tiny_config(p=11), "p"),
        (tiny_config(task="mul"), "task"),
        (tiny_config(epochs=3), "epochs"),
        (tiny_config(batch=2), "batch"),
        (tiny_config(frac=0.5), "frac"),
        (tiny_config(layers=2), "layers"),
        (tiny_config(attention="softmax"), "attention"),
        (tiny_config(model="mlp"), "model"),
    ]:
        assert not can_stack([base, other])
        with pytest.raises(ValueError, match=field):
            check_stackable([base, other])
        with pytest.raises(ValueError, match=field):
            StackedEngine([base, other])
    with pytest.raises(ValueError, match="no configs"):
        check_stackable([])


def test_log_schedule_and_steps_like_train(tmp_path):
    outcomes, runs = stacked([tiny_config(seed=0, epochs=3, preset="none")], tmp_path)
    assert outcomes[0]["state"] == "complete" and runs[0].read_status()["state"] == "complete"
    df = runs[0].read_metrics()
    assert sorted(df.epoch.unique()) == log_epochs(3)
    assert df.run_id.unique().tolist() == ["stack0-seed0"]  # the run folder's name
    assert all(math.isfinite(v) for v in df.value)
    assert np.array_equal(df.groupby("epoch").step.first().to_numpy(), np.array([3, 6, 9]))


# ---------------------------------------------------------------- run folders, checkpoints, resume
def assert_tables_close(got: pd.DataFrame, want: pd.DataFrame) -> None:
    key = ["epoch", "metric"]
    got, want = got.sort_values(key).reset_index(drop=True), want.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(got[key + ["step"]], want[key + ["step"]])
    np.testing.assert_allclose(got.value, want.value, rtol=RTOL, atol=ATOL)


def test_batched_metrics_equal_model_metrics():
    cfgs = configs()
    st = StackedEngine(cfgs)
    assert len(st.train_epoch()) == 3 and (st.epoch, st.step) == (1, 3)
    for i, got in enumerate(st.metrics()):
        want = model_metrics(st.model(i), st.data(i))
        assert list(got) == list(want)
        for name in want:
            assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-6), (i, name)


def test_train_runs_writes_the_folders_train_writes(tmp_path):
    cfgs = configs()
    results = train_runs(cfgs, [str(tmp_path / f"stack{i}") for i in range(3)], engine="stacked")
    assert [r["state"] for r in results] == ["complete"] * 3
    for i, cfg in enumerate(cfgs):
        train(cfg, str(tmp_path / f"alone{i}"), progress=False)
        stacked, alone = RunDir(tmp_path / f"stack{i}"), RunDir(tmp_path / f"alone{i}")
        assert [p.name for p in stacked.checkpoints()] == [p.name for p in alone.checkpoints()]
        assert stacked.read_status()["state"] == "complete" and stacked.read_status()["stacked"] == 3
        assert json.loads(stacked.config.read_text()) == json.loads(alone.config.read_text())
        assert_tables_close(stacked.read_metrics().drop(columns="run_id"), alone.read_metrics().drop(columns="run_id"))
        a, b = load_checkpoint(stacked.checkpoints()[-1]), load_checkpoint(alone.checkpoints()[-1])
        assert (a["epoch"], a["step"], a["config"]) == (b["epoch"], b["step"], b["config"])
        assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
        for j, want in b["optimizer"]["state"].items():
            assert float(a["optimizer"]["state"][j]["step"]) == float(want["step"])
            torch.testing.assert_close(
                a["optimizer"]["state"][j]["exp_avg_sq"], want["exp_avg_sq"], rtol=1e-3, atol=1e-9
            )


def resumed(tmp_path, first, second) -> pd.DataFrame:
    """Train 3 epochs with `first`, then resume to EPOCHS with `second` ("train" or "stack")."""
    cfg, path = configs()[2], str(tmp_path / f"{first}-{second}")
    for how, epochs in ((first, 3), (second, EPOCHS)):
        c = TrainConfig.from_dict({**cfg.to_dict(), "epochs": epochs})
        if how == "train":
            train(c, path, resume=True, progress=False)
        else:
            assert train_runs([c], [path], engine="stacked")[0]["state"] == "complete"
    return RunDir(path).read_metrics().drop(columns="run_id")


def test_stacked_and_single_engines_resume_each_others_runs(tmp_path):
    straight = resumed(tmp_path, "train", "train")
    for first, second in (("stack", "stack"), ("train", "stack"), ("stack", "train")):
        assert_tables_close(resumed(tmp_path, first, second), straight)


def test_a_stack_resumes_only_from_one_epoch(tmp_path):
    cfgs = configs()[:2]
    train(TrainConfig.from_dict({**cfgs[0].to_dict(), "epochs": 2}), str(tmp_path / "a"), progress=False)
    with pytest.raises(ValueError, match="same epoch|no checkpoint"):
        train_runs(cfgs, [str(tmp_path / "a"), str(tmp_path / "b")], engine="stacked")
