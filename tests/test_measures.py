"""The measures of a checkpoint on constructed cases with known answers: LLC, Fourier progress measures, norms."""

from __future__ import annotations

import math

import pytest
import torch

from mdlgrok.config import MeasureConfig, TrainConfig
from mdlgrok.measures import MEASURES, fourier, llc, norms
from mdlgrok.models import build_model
from mdlgrok.tasks import OPERATIONS, make_dataset
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


@pytest.mark.parametrize("n", [11, 12])
def test_fourier_basis_is_orthonormal(n):
    basis = fourier.fourier_basis(n)
    torch.testing.assert_close(basis @ basis.T, torch.eye(n, dtype=torch.float64))
    assert sum(len(rows) for rows in fourier.frequency_rows(n)) == n - 1


def test_primitive_roots():
    assert [fourier.primitive_root(p) for p in (3, 7, 11, 13, 113)] == [2, 3, 2, 2, 3]


@pytest.mark.parametrize("task", ["add", "sub", "mul", "div"])
@pytest.mark.parametrize("p", [7, 11])
def test_the_label_sits_at_coordinate_i_plus_sign_j(task, p):
    group = fourier.coordinates(task, p)
    i, j = torch.meshgrid(torch.arange(group.n), torch.arange(group.n), indexing="ij")
    c = OPERATIONS[task][0](group.residues[i], group.residues[j], p)
    assert torch.equal(c, group.residues[(i + group.sign * j) % group.n])
    assert sorted(group.residues.tolist()) == list(range(p - group.n, p))  # mul, div: every non-zero residue
    assert torch.equal(group.coordinate_of(p)[group.residues], torch.arange(group.n))


def test_no_coordinates_for_mul_mod_a_composite_or_other_tasks():
    assert fourier.coordinates("mul", 9) is None and fourier.coordinates("sq", 11) is None
    assert fourier.coordinates("sub", 9).n == 9


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


@pytest.mark.parametrize("n, keys", [(13, [2, 5]), (12, [2, 6])])
def test_key_frequencies_of_neurons_that_compute_cos_of_i_plus_j(n, keys):
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    acts = torch.stack([torch.cos(2 * math.pi * k * (i + j) / n + phase) for k in keys for phase in (0.0, 1.0)], -1)
    found, explained = fourier.key_frequencies(acts, fourier.fourier_basis(n))
    assert found == keys and explained == 1.0


@pytest.mark.parametrize("n, keys, sign", [(13, [3], 1), (13, [3, 5], -1), (12, [5, 6], 1), (12, [6], -1)])
def test_restricted_and_excluded_loss_of_logits_made_of_key_frequencies(n, keys, sign):
    """Logits cos(w_k (i + sign j - c)) lie in the key directions: restricted keeps them, excluded leaves nothing."""
    scale = 20.0
    basis = fourier.fourier_basis(n)
    i, j, c = torch.meshgrid(torch.arange(n), torch.arange(n), torch.arange(n), indexing="ij")
    logits = scale * sum(torch.cos(2 * math.pi * k * (i + sign * j - c) / n) for k in keys).double()
    labels = (i[..., 0] + sign * j[..., 0]) % n
    train = torch.rand(n, n, generator=torch.Generator().manual_seed(0)) < 0.3
    directions = fourier.sum_directions(n, basis, keys, sign)
    restricted, excluded = fourier.restricted_excluded(logits, labels, train, directions)
    full = torch.nn.functional.cross_entropy(logits.reshape(-1, n), labels.reshape(-1)).item()
    assert restricted == pytest.approx(full, abs=1e-5)  # the loss is taken in float32
    assert excluded == pytest.approx(math.log(n), abs=1e-5)  # nothing left: uniform logits
    other = fourier.sum_directions(n, basis, keys, -sign)  # the wrong sign misses them (k = n/2 alone is even)
    if any(2 * k != n for k in keys):
        assert fourier.restricted_excluded(logits, labels, train, other)[1] < math.log(n) - 0.1


FOURIER_ROWS = {"key_freqs", "neurons_explained", "restricted_loss", "excluded_loss", "gini_embed", "gini_neuron_logit"}


@pytest.mark.parametrize("task", ["add", "sub", "mul", "div"])
def test_fourier_measure_on_the_four_operations(task):
    cfg = TrainConfig(task=task, p=11, epochs=1)
    torch.manual_seed(0)
    model, data = build_model(cfg.model_config()), make_dataset(cfg.task_config())
    rows = {r["metric"]: r["value"] for r in fourier.measure(model, data)}
    assert set(rows) == FOURIER_ROWS and all(math.isfinite(v) for v in rows.values())


def test_an_embedding_sparse_in_discrete_log_frequency_has_gini_near_one_for_mul_only():
    """Rows cos(2 pi 7 log_g(a) / 112): one frequency of the multiplicative group, not of the residues."""
    p = 113
    group = fourier.coordinates("mul", p)
    torch.manual_seed(0)
    sparse = fourier.fourier_basis(p - 1)[[13, 14]].T.float() @ torch.randn(2, 128)
    for task, near_one in (("mul", True), ("add", False)):
        cfg = TrainConfig(task=task, p=p, epochs=1)
        model, data = build_model(cfg.model_config()), make_dataset(cfg.task_config())
        with torch.no_grad():
            model.embed.weight[group.residues] = sparse
        rows = {r["metric"]: r["value"] for r in fourier.measure(model, data)}
        assert (rows["gini_embed"] > 0.95) == near_one, (task, rows["gini_embed"])


def test_no_fourier_rows_for_other_tasks():
    cfg = TrainConfig(task="sq", p=11, epochs=1)
    with pytest.warns(UserWarning, match="defined for add, sub, mul and div"):
        assert fourier.measure(build_model(cfg.model_config()), make_dataset(cfg.task_config())) == []


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
