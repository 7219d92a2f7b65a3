"""Stacked training equals separate Trainer runs (CPU, float tolerance).

Tolerances: metrics rtol 1e-4 / atol 1e-5. The two computations do the same float32 math in a
different order (batched matmuls under vmap, a batched eigvalsh), so single gradients agree to
~1e-7. Adam turns those rounding differences into larger parameter differences where a gradient
is itself at the rounding level: its first steps move each weight by lr * g / (|g| + eps), so
g = 3.6e-8 against 4.3e-8 (a true zero, rounded two ways) moves a weight by 0.78 lr against
0.81 lr. Final weights are therefore compared with atol 1e-4 (0.1 lr); the metrics, sums over
many weights, stay within 1e-4 relative.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_config

from mdlgrok.models import build_model
from mdlgrok.regularizers import mean_spectral_entropy
from mdlgrok.results import RunDir
from mdlgrok.stacked import (
    StackedAdamW,
    StackedTrainer,
    can_stack,
    check_stackable,
    stacked_spectral_entropy,
    train_stacked,
)
from mdlgrok.train import TrainConfig, Trainer, log_epochs, model_metrics

EPOCHS = 5
RTOL, ATOL = 1e-4, 1e-5
WEIGHT_ATOL = 1e-4


def configs() -> list[TrainConfig]:
    return [tiny_config(seed=0, epochs=EPOCHS),
            tiny_config(seed=1, epochs=EPOCHS),
            # different weights, no penalty (its q/k projections then get no gradient at all),
            # uniform noise, its own lr and betas
            tiny_config(seed=2, epochs=EPOCHS, wd=0.3, gamma=0.0, sigma=0.05, noise="uniform", lr=3e-3,
                        betas=(0.8, 0.95))]


def separate(cfg: TrainConfig, tmp_path) -> tuple[dict[int, dict[str, float]], Trainer]:
    trainer = Trainer(cfg, RunDir(tmp_path / f"seed{cfg.seed}"))
    metrics = {}
    for _ in range(cfg.epochs):
        trainer.train_epoch()
        if trainer.epoch in log_epochs(cfg.epochs):
            metrics[trainer.epoch] = model_metrics(trainer.model, trainer.data)
    return metrics, trainer


def test_stacked_equals_separate_runs(tmp_path):
    cfgs = configs()
    st = StackedTrainer(cfgs)
    frames = train_stacked(cfgs, trainer=st)
    assert len(frames) == 3
    for i, cfg in enumerate(cfgs):
        expected, trainer = separate(cfg, tmp_path)
        df = frames[i]
        assert sorted(df.epoch.unique()) == log_epochs(EPOCHS)
        assert (df.step == df.epoch * trainer.step // trainer.epoch).all()  # 3 batches per epoch
        for epoch, metrics in expected.items():
            got = df[df.epoch == epoch].set_index("metric").value
            assert set(got.index) == set(metrics)
            for name, value in metrics.items():
                assert got[name] == pytest.approx(value, rel=RTOL, abs=ATOL), (i, epoch, name)
        final = st.model(i)
        for (name, p), q in zip(trainer.model.named_parameters(), final.parameters()):
            torch.testing.assert_close(q, p.detach(), rtol=0, atol=WEIGHT_ATOL, msg=f"model {i} {name}")


def test_stacked_adamw_matches_torch():
    """Per-model lr, betas, eps and weight decay on stacked tensors = torch.optim.AdamW per model."""
    settings = [{"lr": 1e-3, "betas": (0.9, 0.98), "eps": 1e-8, "weight_decay": 1.0},
                {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}]
    torch.manual_seed(0)
    shapes = [(5, 3), (7,), (2, 3, 4)]
    inits = [[torch.randn(s) for s in shapes] for _ in settings]
    refs = [[p.clone().requires_grad_(True) for p in init] for init in inits]
    opts = [torch.optim.AdamW(ref, **kw) for ref, kw in zip(refs, settings)]
    stacked = {str(j): torch.stack([init[j] for init in inits]).requires_grad_(True) for j in range(len(shapes))}
    ours = StackedAdamW(stacked, [s["lr"] for s in settings], [s["betas"] for s in settings],
                        [s["eps"] for s in settings], [s["weight_decay"] for s in settings])
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
    got = stacked_spectral_entropy(params)
    want = torch.stack([mean_spectral_entropy(m) for m in models]).detach()
    torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-6)


def test_diverged_model_does_not_disturb_the_others(tmp_path):
    cfgs = configs()[:2]
    st = StackedTrainer(cfgs)
    with torch.no_grad():
        st.params["readout.weight"][1].fill_(float("nan"))
    frames = train_stacked(cfgs, epochs=2, trainer=st)
    assert "loss became nan" in st.models_state[1].failed
    assert frames[1].empty
    expected, _ = separate(tiny_config(seed=0, epochs=2), tmp_path)
    got = frames[0][frames[0].epoch == 2].set_index("metric").value
    for name, value in expected[2].items():
        assert got[name] == pytest.approx(value, rel=RTOL, abs=ATOL), name


def test_can_stack_and_its_errors():
    base = tiny_config()
    assert can_stack([base, tiny_config(seed=3, wd=0.1, gamma=0.0, sigma=0.0, lr=1e-2)])
    check_stackable([base, tiny_config(seed=3, noise="uniform")])
    for other, field in [(tiny_config(p=11), "p"), (tiny_config(task="mul"), "task"),
                         (tiny_config(epochs=3), "epochs"), (tiny_config(batch=2), "batch"),
                         (tiny_config(frac=0.5), "frac"), (tiny_config(layers=2), "layers"),
                         (tiny_config(attention="softmax"), "attention"), (tiny_config(model="mlp"), "model")]:
        assert not can_stack([base, other])
        with pytest.raises(ValueError, match=field):
            check_stackable([base, other])
        with pytest.raises(ValueError, match=field):
            StackedTrainer([base, other])
    with pytest.raises(ValueError, match="no configs"):
        check_stackable([])


def test_log_schedule_and_steps_like_train():
    frames = train_stacked([tiny_config(seed=0, epochs=3, preset="none")])
    df = frames[0]
    assert sorted(df.epoch.unique()) == log_epochs(3)
    assert df.run_id.unique().tolist() == ["stack0-seed0"]
    assert all(math.isfinite(v) for v in df.value)
    assert np.array_equal(df.groupby("epoch").step.first().to_numpy(), np.array([3, 6, 9]))
