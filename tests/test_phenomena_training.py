"""Training options of the grokking phenomena: Grokfast's EMA gradient filter, starting from
another run's weights, training on a subset of its examples."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from mdlgrok.config import TrainConfig
from mdlgrok.regularizers import EmaGradFilter
from mdlgrok.runs import load_checkpoint, model_from_checkpoint
from mdlgrok.sweep.spec import run_key
from mdlgrok.tasks import make_dataset
from mdlgrok.training import train, train_runs
from mdlgrok.training.start import init_checkpoint, initial_model, training_data
from tests.conftest import tiny_config


def grokfast_ema(grads, new, alpha, lamb):
    """ironjr/grokfast's gradfilter_ema, transcribed for a dict of gradients (mutates `new`)."""
    if grads is None:
        grads = {n: g.detach().clone() for n, g in new.items()}
    for n in new:
        grads[n] = grads[n] * alpha + new[n].detach() * (1 - alpha)
        new[n] = new[n] + grads[n] * lamb
    return grads


def test_ema_filter_is_grokfasts_update():
    torch.manual_seed(0)
    steps = [{"w": torch.randn(3, 2), "b": torch.randn(2)} for _ in range(4)]
    ours, ref_state = EmaGradFilter(0.9, 2.5), None
    for g in steps:
        mine = {k: v.clone() for k, v in g.items()}
        ref = {k: v.clone() for k, v in g.items()}
        ours(mine)
        ref_state = grokfast_ema(ref_state, ref, 0.9, 2.5)
        for k in g:
            torch.testing.assert_close(mine[k], ref[k])
    first = {"w": torch.ones(2)}
    EmaGradFilter(0.98, 2.0)(first)
    torch.testing.assert_close(first["w"], torch.full((2,), 3.0))  # mu starts at the first gradient: g + 2 g


def test_ema_filter_per_model_lambda_broadcasts_over_a_stack():
    f = EmaGradFilter(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0]))
    g = {"w": torch.ones(2, 3, 4)}
    f(g)
    assert torch.equal(g["w"][0], torch.full((3, 4), 2.0)) and torch.equal(g["w"][1], torch.ones(3, 4))


def _metrics(path):
    return pd.read_parquet(path / "metrics.parquet")[["epoch", "metric", "value"]]


def test_a_filtered_run_resumes_exactly(tmp_path):
    cfg = tiny_config(grad_filter="ema", epochs=6)
    train(cfg, tmp_path / "straight", progress=False)
    train(tiny_config(grad_filter="ema", epochs=3), tmp_path / "resumed", progress=False)
    train(cfg, tmp_path / "resumed", resume=True, progress=False)
    pd.testing.assert_frame_equal(_metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed"))
    ckpt = load_checkpoint(sorted((tmp_path / "straight" / "checkpoints").glob("*.pt"))[-1])
    assert set(ckpt["grad_filter"]) >= {"embed.weight", "readout.weight"}


def test_the_filter_changes_training_and_stacks_like_single_runs(tmp_path):
    plain, ema = tiny_config(epochs=4), tiny_config(epochs=4, grad_filter="ema", grad_lambda=5.0)
    train(plain, tmp_path / "plain", progress=False)
    train(ema, tmp_path / "ema", progress=False)
    assert not _metrics(tmp_path / "plain").equals(_metrics(tmp_path / "ema"))
    train_runs([plain, ema], [tmp_path / "s0", tmp_path / "s1"], engine="stacked")
    for single, stacked in (("plain", "s0"), ("ema", "s1")):
        a, b = _metrics(tmp_path / single), _metrics(tmp_path / stacked)
        pd.testing.assert_series_equal(a.value, b.value, rtol=1e-4, atol=1e-6)


def test_subset_is_drawn_from_the_splits_training_examples_only():
    cfg = TrainConfig(task="add", p=11, frac=0.6, subset=20, seed=3)
    full, sub = make_dataset(cfg.task_config()), training_data(cfg)
    assert len(sub.y_train) == 20 and torch.equal(sub.x_test, full.x_test)
    train_rows = {tuple(r) for r in full.x_train.tolist()}
    assert all(tuple(r) in train_rows for r in sub.x_train.tolist())
    assert len({tuple(r) for r in sub.x_train.tolist()}) == 20
    assert torch.equal(training_data(cfg).x_train, sub.x_train)  # seeded
    with pytest.raises(ValueError, match="larger than"):
        training_data(TrainConfig(task="add", p=11, frac=0.6, subset=1000))


def test_init_from_starts_at_that_runs_weights_and_checks_the_split(tmp_path):
    base = tiny_config(epochs=3)
    train(base, tmp_path / "base", progress=False)
    ungrok = tiny_config(epochs=4, init_from=f"{tmp_path / 'base'}:2", subset=5)
    train(ungrok, tmp_path / "ungrok", progress=False)
    start = load_checkpoint(tmp_path / "base" / "checkpoints" / "epoch_000002.pt")["model"]
    for k, v in initial_model(ungrok).state_dict().items():
        assert torch.equal(v, start[k]), k
    model, data, _, _ = model_from_checkpoint(tmp_path / "ungrok" / "checkpoints" / "epoch_000004.pt")
    assert len(data.y_train) == 5  # what the run trained on: its subset of the base run's split
    assert torch.equal(data.x_train, training_data(ungrok).x_train)
    with pytest.raises(ValueError, match="another split"):
        init_checkpoint(tiny_config(seed=1, init_from=str(tmp_path / "base")))
    with pytest.raises(FileNotFoundError):
        train(tiny_config(init_from=str(tmp_path / "nothing")), tmp_path / "x", progress=False)


def test_a_run_from_another_runs_weights_on_a_subset_resumes_exactly(tmp_path):
    train(tiny_config(epochs=3), tmp_path / "base", progress=False)
    start = {"init_from": f"{tmp_path / 'base'}:2", "subset": 5}
    train(tiny_config(epochs=6, **start), tmp_path / "straight", progress=False)
    train(tiny_config(epochs=3, **start), tmp_path / "resumed", progress=False)
    train(tiny_config(epochs=6, **start), tmp_path / "resumed", resume=True, progress=False)
    pd.testing.assert_frame_equal(_metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed"))


def test_options_switched_off_keep_run_keys_and_switched_on_name_themselves():
    paper = TrainConfig(task="add", preset="ours", seed=0, epochs=10000)
    assert run_key(paper) == "add-ours-s0-499398b7626f"  # the key of the committed paper-length run
    assert run_key(TrainConfig(grad_filter="ema")).startswith("add-ours-ema2-s0-")
    assert run_key(TrainConfig(subset=500, init_from="runs/x")).startswith("add-ours-init-D500-s0-")
