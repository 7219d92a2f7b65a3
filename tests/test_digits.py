"""Grokking beyond algorithms: the digits task, the alpha-scaled dense MLP, squared error, float64."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from mdlgrok.analysis import main_eps
from mdlgrok.cli import main
from mdlgrok.config import TrainConfig
from mdlgrok.measures import fourier
from mdlgrok.models import DenseMLP, ModelConfig, build_model, n_params
from mdlgrok.runs import RunDir, model_from_checkpoint
from mdlgrok.sweep.spec import config_hash, effective, run_key
from mdlgrok.tasks import TaskConfig, make_dataset
from mdlgrok.training.objective import cross_entropy, evaluate, squared_error, task_loss
from mdlgrok.training.single import SingleEngine
from mdlgrok.training.stacked import StackedEngine


def digits_config(**kw) -> TrainConfig:
    base = dict(task="digits", model="dense", preset="wd", wd=0.01, loss="mse", batch=200, width=16, epochs=2)
    return TrainConfig(**{**base, **kw})


def test_digits_split_has_1000_training_images_of_64_pixels_in_0_1():
    data = make_dataset(TaskConfig("digits"))
    assert data.x_train.shape == (1000, 64) and data.x_test.shape == (797, 64)
    assert data.x_train.dtype == torch.float32 and 0 <= data.x_train.min() and data.x_train.max() <= 1
    assert set(data.y_train.tolist()) == set(range(10))
    again, other = make_dataset(TaskConfig("digits")), make_dataset(TaskConfig("digits", seed=1))
    assert torch.equal(again.x_train, data.x_train) and not torch.equal(other.x_train, data.x_train)
    assert len(make_dataset(TaskConfig("digits", frac=0.5)).y_train) == 898  # round(0.5 * 1797)


def test_digits_takes_the_dense_model_and_the_dense_model_takes_digits():
    with pytest.raises(ValueError, match="digits takes --model dense"):
        TrainConfig(task="digits")
    with pytest.raises(ValueError, match="add takes a token model"):
        TrainConfig(task="add", model="dense")
    with pytest.raises(ValueError, match="loss must be one of"):
        digits_config(loss="hinge")
    assert digits_config().layers == 2  # 64-w-w-10


def test_dense_mlp_is_omnigroks_64_200_200_10():
    model = build_model(ModelConfig(model="dense", layers=2, width=200))
    assert isinstance(model, DenseMLP)
    assert n_params(model) == 64 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10
    assert model(torch.zeros(3, 64)).shape == (3, 10)


def test_init_scale_multiplies_every_parameter():
    torch.manual_seed(0)
    plain = build_model(ModelConfig(model="dense", width=8))
    torch.manual_seed(0)
    scaled = build_model(ModelConfig(model="dense", width=8, init_scale=8.0))
    for (name, a), b in zip(plain.named_parameters(), scaled.parameters()):
        assert torch.equal(b, a * 8.0), name


def test_squared_error_known_values():
    y = torch.tensor([3, 0])
    assert float(squared_error(torch.zeros(2, 10), y)) == pytest.approx(0.5)  # the zero network
    assert float(squared_error(nn.functional.one_hot(y, 10).float(), y)) == 0.0
    out = torch.randn(5, 10)
    y = torch.randint(0, 10, (5,))
    mse = nn.functional.mse_loss(out, nn.functional.one_hot(y, 10).float())
    assert float(task_loss(out, y, "mse")) == pytest.approx(5 * float(mse), rel=1e-6)  # K/2 MSELoss
    stacked = task_loss(torch.stack([out, out * 2]), torch.stack([y, y]), "mse")
    assert stacked.shape == (2,) and float(stacked[0]) == pytest.approx(float(task_loss(out, y, "mse")))


def test_off_options_stay_out_of_the_key_and_on_options_name_it():
    add = TrainConfig(task="add", epochs=600)
    assert run_key(add) == "add-ours-s0-ee9cc58388ef"  # the key before these options existed (docs/sweeps.md)
    assert not {"init_scale", "loss", "width", "dtype"} & set(effective(add))
    assert config_hash(TrainConfig(task="add", p=7, loss="mse")) != config_hash(TrainConfig(task="add", p=7))
    key = run_key(digits_config(init_scale=8.0, dtype="float64"))
    assert key.startswith("digits-wd-dense-wd0.01-w16-a8-mse-float64-s0-")
    assert run_key(digits_config()) != run_key(digits_config(init_scale=8.0))


def test_width_and_init_scale_are_checked():
    with pytest.raises(ValueError, match="width"):
        TrainConfig(task="add", width=64)
    with pytest.raises(ValueError, match="width"):
        digits_config(width=0)
    with pytest.raises(ValueError, match="init_scale"):
        digits_config(init_scale=float("inf"))


def test_engines_train_on_the_runs_loss():
    for loss, fn in (("mse", squared_error), ("ce", cross_entropy)):
        engine = SingleEngine(digits_config(loss=loss))
        data = engine.data()
        with torch.no_grad():
            want = float(fn(engine.model()(data.x_train), data.y_train))
        assert engine.metrics()[0]["train_loss"] == pytest.approx(want, rel=1e-6)
        assert StackedEngine([digits_config(loss=loss)]).metrics()[0]["train_loss"] == pytest.approx(want, rel=1e-5)


def test_single_and_stacked_engines_agree_on_digits():
    cfgs = [digits_config(init_scale=a, seed=s) for a, s in ((1.0, 0), (8.0, 1))]
    stack = StackedEngine(cfgs)
    stack.train_epoch()
    for i, cfg in enumerate(cfgs):
        single = SingleEngine(cfg)
        single.train_epoch()
        want, got = single.metrics()[0], stack.metrics()[i]
        for name in ("train_loss", "test_loss", "test_acc", "weight_norm"):
            assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-6), (i, name)


def test_float64_runs_train_and_reload_in_float64(tmp_path):
    out = tmp_path / "run"
    args = ["--task", "digits", "--model", "dense", "--loss", "mse", "--width", "8", "--batch", "200"]
    assert main(["train", *args, "--dtype", "float64", "--epochs", "2", "--out", str(out), "--quiet"]) == 0
    model, data, epoch, _ = model_from_checkpoint(RunDir(out).checkpoints()[-1])
    assert epoch == 2 and next(model.parameters()).dtype == torch.float64 and data.x_train.dtype == torch.float64
    assert data.loss == "mse"
    engine = SingleEngine(TrainConfig(task="digits", model="dense", width=8, dtype="float64"))
    assert {p.dtype for p in engine.model().parameters()} == {torch.float64}
    stack = StackedEngine([digits_config(dtype="float64", seed=s) for s in (0, 1)])
    stack.train_epoch()
    assert stack.gamma.dtype == torch.float64 and {p.dtype for p in stack.params.values()} == {torch.float64}
    # a float64 run resumes to the same weights as one trained straight through
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3", "--quiet"]) == 0
    straight = tmp_path / "straight"
    assert main(["train", *args, "--dtype", "float64", "--epochs", "3", "--out", str(straight), "--quiet"]) == 0
    a, b = (model_from_checkpoint(RunDir(r).checkpoints()[-1])[0] for r in (out, straight))
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), name


def test_digits_run_is_measured_with_its_own_loss(tmp_path):
    out = tmp_path / "run"
    args = ["--task", "digits", "--model", "dense", "--loss", "mse", "--width", "8", "--init-scale", "8"]
    assert main(["train", *args, "--epochs", "2", "--out", str(out), "--quiet", "--measure", "--eps", "0.05"]) == 0
    measures = pd.read_parquet(out / "measures.parquet")
    rows = measures[(measures.metric == "coarse_train_loss") & (measures.epoch == 2)]
    model, data, _, _ = model_from_checkpoint(RunDir(out).checkpoints()[-1])
    train_loss = evaluate(model, data.x_train, data.y_train, loss="mse")[0]
    assert len(rows) == 1 and float(rows.value.iloc[0]) <= train_loss + 0.05 + 1e-6  # the mse constraint held
    with pytest.warns(UserWarning, match="no fourier rows"):
        assert fourier.measure(model, data) == []
    table = pd.concat([pd.read_parquet(out / "metrics.parquet"), measures]).assign(task="digits")
    assert main_eps(table) == 0.05
    assert main_eps(table.assign(eps=table.eps.replace(0.05, 0.5))) == 0.5  # nothing below 0.5 measured
