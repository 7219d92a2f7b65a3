"""The paper's estimator (`paper_estimate`): bz2(pickle(float32 arrays)), global (tau, delta),
Bayesian optimization with 2 probes + 10 random + 50 guided points per eps, Results of the
same shape as `estimate`'s; and a decoder that never unpickles anything but numpy arrays."""

import builtins
import bz2
import copy
import math
import os
import pickle
import subprocess

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mdlgrok.complexity import PAPER_EPS, decode_paper, estimate, paper, paper_estimate
from mdlgrok.complexity.coarse import targets_of
from mdlgrok.complexity.paper import coarse_arrays, size_bytes
from mdlgrok.complexity.payload import matrix_shape


def tiny_problem(dtype=torch.float32):
    torch.manual_seed(0)
    x = torch.randn(48, 4, dtype=dtype)
    y = (x[:, 0] > x[:, 1]).long() + (x[:, 2] > 0.5).long()
    model = nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    calls = []

    def loss_fn(m):
        calls.append(1)
        with torch.no_grad():
            return float(F.cross_entropy(m(x), y))

    return model, loss_fn, calls


def shapes_of(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def decoded_loss(model, loss_fn, payload):
    probe = copy.deepcopy(model)
    state = probe.state_dict()
    state.update(decode_paper(payload, shapes_of(model)))
    probe.load_state_dict(state)
    return loss_fn(probe)


@pytest.fixture(scope="module")
def full_search():
    """One eps with the paper's full budget: 2 + 10 + 50 loss evaluations."""
    model, loss_fn, calls = tiny_problem()
    results = paper_estimate(model, loss_fn, eps=[0.5])
    return model, loss_fn, len(calls), results


def test_paper_mode_spends_62_loss_evaluations_per_eps(full_search):
    _, _, calls, (r,) = full_search
    assert len(paper.PROBES) + paper.INIT_POINTS + paper.N_ITER == 62
    assert r.loss_evals == 62
    assert calls == 2 + 62  # the original model twice (its loss must repeat), then the search


def test_paper_mode_result_is_honest(full_search):
    model, loss_fn, _, (r,) = full_search
    assert r.estimator == "paper" and r.eps == 0.5
    assert r.bits == 8 * len(r.payload)
    assert r.codec_bits == {r.codec: r.bits}
    assert r.base_loss == loss_fn(model)
    assert decoded_loss(model, loss_fn, r.payload) == r.coarse_loss
    assert r.coarse_loss <= r.base_loss + r.eps
    check_choices(model, r)


def check_choices(model, r):
    """Choices per coded tensor, as estimate's (name, kind, rank, bins, rows, fourier) plus the
    search's one global tau; one bin (the global delta) per coded array."""
    decoded = decode_paper(r.payload, shapes_of(model))
    assert [c["name"] for c in r.choices] == list(decoded)
    assert set(decoded) <= set(model.state_dict())
    taus = {c["tau"] for c in r.choices}
    deltas = {b for c in r.choices for b in c["bins"]}
    assert len(taus) == 1 and 0 <= taus.pop() <= 1
    assert len(deltas) == 1 and 1e-3 <= deltas.pop() <= 1
    for c in r.choices:
        assert set(c) == {"name", "kind", "rank", "bins", "rows", "fourier", "transposed", "tau"}
        assert c["rows"] is None and c["fourier"] is None and c["transposed"] is None
        if c["kind"] == "lowrank":
            assert len(c["bins"]) == 2 and 0 <= c["rank"] < min(decoded[c["name"]].shape)  # tau 0: rank 0
            assert torch.linalg.matrix_rank(decoded[c["name"]], rtol=1e-4) <= c["rank"]  # float32 product
        else:
            assert c["kind"] == "dense" and len(c["bins"]) == 1 and c["rank"] is None


def test_paper_estimate_defaults_to_the_papers_eps_and_shares_the_result_shape(short_search):
    model, loss_fn, _ = tiny_problem()
    results = paper_estimate(model, loss_fn)
    assert [r.eps for r in results] == list(PAPER_EPS)
    (mine,) = estimate(model, loss_fn, [1.0])
    for r in results:
        assert type(r) is type(mine) and r.estimator == "paper" and mine.estimator == "mdlgrok"
        assert r.naive_bits == mine.naive_bits and r.base_loss == mine.base_loss
        assert r.ratio == r.naive_bits / r.bits
        check_choices(model, r)
    with pytest.raises(ValueError, match="eps"):
        paper_estimate(model, loss_fn, [0.5, -1.0])


@pytest.fixture
def short_search(monkeypatch):
    """The same procedure with a shorter budget, for the tests that need several searches."""
    monkeypatch.setattr(paper, "INIT_POINTS", 2)
    monkeypatch.setattr(paper, "N_ITER", 3)
    return 2 + 2 + 3


def test_one_search_per_eps_in_the_order_given(short_search):
    model, loss_fn, calls = tiny_problem()
    eps = [0.05, 2.0, 0.5]
    results = paper_estimate(model, loss_fn, eps=eps)
    assert [r.eps for r in results] == eps
    assert [r.loss_evals for r in results] == [short_search] * 3
    assert len(calls) == 2 + 3 * short_search  # the original twice (its loss must repeat), then the searches
    for r in results:
        assert r.bits == 8 * len(r.payload)
        assert decoded_loss(model, loss_fn, r.payload) == r.coarse_loss <= r.base_loss + r.eps


def test_minibatch_constraint_never_reports_an_infeasible_point(short_search):
    """The paper's last-minibatch check guides the search; the figure is checked on the full loss."""
    model, loss_fn, _ = tiny_problem()
    (r,) = paper_estimate(model, loss_fn, [0.05], constraint_fn=lambda m: 0.0)  # everything "feasible"
    assert r.coarse_loss <= r.base_loss + 0.05
    assert decoded_loss(model, loss_fn, r.payload) == r.coarse_loss


def test_nothing_feasible_falls_back_to_weights_whose_loss_is_measured(short_search):
    """A float64 model whose loss is NaN unless its weights are exact: the float32 fallback is
    not the original, and the figure must say so rather than claim the original's loss."""
    model, _, _ = tiny_problem(torch.float64)
    reference = copy.deepcopy(model.state_dict())

    def loss_fn(m):
        return 0.3 if all(torch.equal(v, reference[k]) for k, v in m.state_dict().items()) else math.nan

    (r,) = paper_estimate(model, loss_fn, [1.0])
    assert r.bits == 8 * len(r.payload)
    measured = decoded_loss(model, loss_fn, r.payload)
    assert r.coarse_loss == measured or (math.isnan(measured) and not r.coarse_loss <= r.base_loss + r.eps)


def test_nothing_feasible_in_float32_is_the_exact_weights(short_search):
    model, _, _ = tiny_problem()
    reference = copy.deepcopy(model.state_dict())

    def loss_fn(m):
        return 0.3 if all(torch.equal(v, reference[k]) for k, v in m.state_dict().items()) else math.nan

    (r,) = paper_estimate(model, loss_fn, [1.0])
    assert r.coarse_loss == 0.3 == decoded_loss(model, loss_fn, r.payload)


# ---------------------------------------------------------------- the paper's coarse-graining
def test_coarse_arrays_use_the_papers_rank_and_factor_only_when_cheaper():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 10, generator=g)
    targets = targets_of({"w": w, "b": torch.randn(5, generator=g), "n": torch.arange(3)})
    full = coarse_arrays(targets, 1.0, 1e-3)
    assert set(full) == {"w", "b"}  # integer tensors are not coarse-grained
    assert len(full["w"]) == 1 and full["w"][0].shape == (12, 10)  # rank 9: 9*22 > 120, the whole matrix
    assert np.abs(full["w"][0] - w.numpy()).max() <= 0.5e-3 + 1e-6
    s = np.linalg.svd(w.numpy(), compute_uv=False)
    tau = s[:4].sum() / s.sum()  # rank_for_tau = 4, the paper keeps 3
    a, b = coarse_arrays(targets, tau, 1e-3)["w"]
    assert a.shape == (12, 3) and b.shape == (3, 10)
    assert all(x.dtype == np.float32 for x in (a, b))
    assert np.allclose(a / 1e-3, np.round(a / 1e-3), atol=1e-2)  # on the grid of delta


def test_decode_paper_round_trips_legitimate_arrays():
    g = torch.Generator().manual_seed(1)
    state = {"w": torch.randn(12, 10, generator=g), "b": torch.randn(5, generator=g)}
    targets = targets_of(state)
    arrays = coarse_arrays(targets, 0.5, 1e-2)
    out = decode_paper(size_bytes(arrays), {k: tuple(v.shape) for k, v in state.items()})
    assert set(out) == {"w", "b"}
    np.testing.assert_array_equal(out["w"].numpy(), arrays["w"][0] @ arrays["w"][1])
    np.testing.assert_array_equal(out["b"].numpy(), arrays["b"][0])
    # without shapes, each tensor keeps its matrix shape (the same here: none has more than two dimensions)
    bare = decode_paper(size_bytes(arrays))
    assert set(bare) == set(out) and all(torch.equal(bare[k], out[k]) for k in out)


def test_decode_paper_reshapes_tensors_of_more_than_two_dimensions_when_given_shapes():
    g = torch.Generator().manual_seed(2)
    state = {"conv": torch.randn(4, 3, 2, generator=g)}
    arrays = coarse_arrays(targets_of(state), 1.0, 1e-3)
    out = decode_paper(size_bytes(arrays), {"conv": (4, 3, 2)})
    assert out["conv"].shape == (4, 3, 2)
    assert decode_paper(size_bytes(arrays))["conv"].shape == matrix_shape((4, 3, 2))  # without shapes: the matrix
    assert torch.allclose(out["conv"], state["conv"], atol=0.5e-3 + 1e-6)


# ---------------------------------------------------------------- safe unpickling
class Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize(
    "make",
    [
        lambda marker: Reduce(os.system, (f"touch {marker}",)),
        lambda marker: Reduce(builtins.exec, (f"open({str(marker)!r}, 'w').close()",)),
        lambda marker: Reduce(subprocess.call, (["touch", str(marker)],)),
        lambda marker: Reduce(np.frombuffer, (b"\x00" * 8,)),  # numpy, but not an array constructor we allow
    ],
)
def test_decode_paper_refuses_anything_but_numpy_arrays(tmp_path, make):
    marker = tmp_path / "executed"
    evil = {"w": [np.zeros((2, 2), dtype=np.float32), make(marker)]}
    payload = bz2.compress(pickle.dumps(evil, protocol=4))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        decode_paper(payload, {"w": (2, 2)})
    assert not marker.exists()


def test_constraint_fn_is_paper_estimates_alone(short_search):
    model, loss_fn, _ = tiny_problem()
    seen = []
    (r,) = paper_estimate(model, loss_fn, [0.05], constraint_fn=lambda m: seen.append(1) or 0.0)
    assert seen and r.coarse_loss <= r.base_loss + 0.05
    with pytest.raises(TypeError, match="constraint_fn"):  # mdlgrok's search has no minibatch check
        estimate(model, loss_fn, [0.05], constraint_fn=lambda m: 0.0)
