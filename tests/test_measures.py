"""The measures of a checkpoint on constructed cases with known answers: LLC, Fourier progress measures, norms."""

from __future__ import annotations

import math

import pytest
import torch

from mdlgrok.config import MeasureConfig, TrainConfig
from mdlgrok.measures import MEASURES, fourier, llc, norms
from mdlgrok.models import build_model
from mdlgrok.tasks import make_dataset
from mdlgrok.training.objective import model_metrics


class Quadratic(torch.nn.Module):
    """L(w) = 1/2 sum_i h_i w_i^2: a regular minimum at 0, whose learning coefficient is d/2."""

    def __init__(self, d: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))
        self.h = torch.linspace(0.5, 2.0, d, dtype=torch.float64)

    def loss(self) -> torch.Tensor:
        return 0.5 * (self.h * self.w**2).sum()


@pytest.mark.parametrize("d", [4, 10])
def test_llc_of_a_regular_quadratic_is_half_its_dimension(d):
    model = Quadratic(d)
    nbeta, gamma = 200.0, 1.0
    opts = llc.SGLD(lr=2e-4, gamma=gamma, nbeta=nbeta, chains=4, draws=3000, burnin=500, batch=1, seed=1)
    chains = llc.sgld_llc(model, lambda m, idx: m.loss(), 0.0, 1, opts)
    # the SGLD posterior exp(-nbeta L - gamma |w|^2 / 2) gives E[nbeta L] = sum_i nbeta h_i / (2 (nbeta h_i + gamma))
    want = sum(nbeta * h / (2 * (nbeta * h + gamma)) for h in model.h.tolist())
    assert abs(want - d / 2) < 0.05 * d
    assert sum(chains) / len(chains) == pytest.approx(want, rel=0.1)


def test_sgld_step_is_devinterps_update():
    """devinterp 1.3.2 SGLD: dw = nbeta * grad + localization * (w - w0); w += -lr/2 * dw + sqrt(lr) * N(0, 1)."""
    torch.manual_seed(0)
    w, c, g = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 3)
    lr, nbeta, gamma = 1e-3, 37.0, 5.0
    noise = torch.randn(5, 3, generator=torch.Generator().manual_seed(7))
    want = w - 0.5 * lr * (nbeta * g + gamma * (w - c)) + math.sqrt(lr) * noise
    got = w.clone()
    llc.sgld_step([got], [g], [c], lr, nbeta, gamma, torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, want)
    frozen = w.clone()  # a parameter without gradient only feels the localization and the noise
    llc.sgld_step([frozen], [None], [c], lr, nbeta, gamma, torch.Generator().manual_seed(7))
    torch.testing.assert_close(frozen, w - 0.5 * lr * gamma * (w - c) + math.sqrt(lr) * noise)


def test_llc_default_nbeta_is_batch_over_log_batch_and_runs_are_seeded():
    assert llc.default_nbeta(512) == pytest.approx(512 / math.log(512))
    cfg = TrainConfig(task="add", p=7, epochs=1)
    torch.manual_seed(0)
    model, data = build_model(cfg.model_config()), make_dataset(cfg.task_config())
    mcfg = MeasureConfig(measures=("llc",), llc_draws=5, llc_burnin=2, llc_batch=4)
    first, again = llc.measure(model, data, mcfg), llc.measure(model, data, mcfg)
    assert [r["metric"] for r in first] == ["llc", "llc_std"]
    assert first == again and math.isfinite(first[0]["value"])


def test_fourier_basis_is_orthonormal():
    basis = fourier.fourier_basis(11)
    torch.testing.assert_close(basis @ basis.T, torch.eye(11, dtype=torch.float64))


def test_gini_of_one_hot_and_uniform():
    assert fourier.gini(torch.tensor([0.0, 0.0, 0.0, 5.0])) == pytest.approx(0.75)
    assert fourier.gini(torch.ones(10)) == pytest.approx(0.0)


def test_fourier_sparse_embedding_has_gini_near_one_and_a_random_one_does_not():
    p, d = 113, 128
    basis = fourier.fourier_basis(p)
    torch.manual_seed(0)
    sparse = basis[[2 * 14 - 1, 2 * 14, 2 * 35 - 1, 2 * 35]].T @ torch.randn(4, d, dtype=torch.float64)
    assert fourier.gini(fourier.fourier_norms(sparse, basis)) > 0.95
    assert fourier.gini(fourier.fourier_norms(torch.randn(p, d), basis)) < 0.3


def test_key_frequencies_of_neurons_that_compute_cos_of_a_plus_b():
    p, keys = 13, [2, 5]
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    acts = torch.stack([torch.cos(2 * math.pi * k * (a + b) / p + phase) for k in keys for phase in (0.0, 1.0)], -1)
    found, explained = fourier.key_frequencies(acts, fourier.fourier_basis(p))
    assert found == keys and explained == 1.0


def test_restricted_and_excluded_loss_of_logits_made_of_key_frequencies():
    """Logits cos(w_k (a + b - c)) lie in the key directions: restricted keeps them, excluded leaves nothing."""
    p, keys, scale = 13, [3], 20.0
    basis = fourier.fourier_basis(p)
    a, b, c = torch.meshgrid(torch.arange(p), torch.arange(p), torch.arange(p), indexing="ij")
    logits = scale * sum(torch.cos(2 * math.pi * k * (a + b - c) / p) for k in keys).double()
    labels = (a[..., 0] + b[..., 0]) % p
    train = torch.rand(p, p, generator=torch.Generator().manual_seed(0)) < 0.3
    restricted, excluded = fourier.restricted_excluded(logits, labels, train, fourier.sum_directions(p, basis, keys))
    full = torch.nn.functional.cross_entropy(logits.reshape(-1, p), labels.reshape(-1)).item()
    assert restricted == pytest.approx(full, abs=1e-5)  # the loss is taken in float32
    assert excluded == pytest.approx(math.log(p), abs=1e-5)  # nothing left: uniform logits


def test_fourier_measure_on_the_paper_model_and_not_on_other_tasks():
    cfg = TrainConfig(task="add", p=11, epochs=1)
    torch.manual_seed(0)
    model, data = build_model(cfg.model_config()), make_dataset(cfg.task_config())
    rows = {r["metric"]: r["value"] for r in fourier.measure(model, data)}
    assert set(rows) == {
        "key_freqs",
        "neurons_explained",
        "restricted_loss",
        "excluded_loss",
        "gini_embed",
        "gini_neuron_logit",
    }
    assert all(math.isfinite(v) for v in rows.values())
    mul = TrainConfig(task="mul", p=11, epochs=1)
    with pytest.warns(UserWarning, match="defined for add"):
        assert fourier.measure(build_model(mul.model_config()), make_dataset(mul.task_config())) == []


def test_norms_measure_is_the_training_metrics_definition():
    cfg = TrainConfig(task="add", p=7, epochs=1)
    torch.manual_seed(0)
    model, data = build_model(cfg.model_config()), make_dataset(cfg.task_config())
    rows = {r["metric"]: r["value"] for r in norms.measure(model, data, MeasureConfig(measures=("norms",)))}
    recorded = model_metrics(model, data)
    for metric in ("weight_norm", "spectral_entropy", "effective_rank"):
        assert rows[metric] == pytest.approx(recorded[metric], rel=1e-12)


def test_every_measure_names_what_it_expects():
    cfg = MeasureConfig(eps=(1.0, 0.5), measures=tuple(MEASURES))
    for name, module in MEASURES.items():
        expected = module.expected(cfg)
        assert expected and all(len(e) == 4 for e in expected), name
