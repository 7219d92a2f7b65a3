import math

import pytest
import torch

from mdlgrok.config import TrainConfig
from mdlgrok.models import ModelConfig, build_model
from mdlgrok.regularizers import (
    PRESETS,
    RegConfig,
    WeightNoise,
    draw_noise,
    effective_ranks,
    mean_spectral_entropy,
    preset,
    singular_values,
    spectral_entropy,
    weight_matrices,
)

SHAPES = [(7, 3), (3, 7), (5, 5), (9, 3), (12, 4), (4, 12), (16, 9), (115, 128), (128, 128), (512, 128)]


def random_matrices(seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) / math.sqrt(s[1])).requires_grad_(requires_grad) for s in SHAPES]


def test_singular_values_match_svdvals():
    mats = random_matrices()
    ours = singular_values(mats)
    assert len(ours) == len(mats)
    for w, s in zip(mats, ours):
        ref = torch.linalg.svdvals(w)
        assert s.shape == ref.shape == (min(w.shape),) and s.dtype == w.dtype
        assert torch.all(s[:-1] >= s[1:])  # descending like svdvals
        torch.testing.assert_close(s, ref, rtol=1e-4, atol=1e-5 * float(ref[0]))


def test_singular_values_handle_rank_deficiency():
    u, v = torch.randn(10, 1), torch.randn(1, 6)
    s = singular_values([u @ v])[0]
    torch.testing.assert_close(s[0], torch.linalg.svdvals(u @ v)[0], rtol=1e-5, atol=0)
    assert torch.all(s[1:] < 1e-3 * s[0])
    assert torch.isfinite(s).all()


def test_spectral_entropy_gradient_matches_svdvals_gradient():
    a = random_matrices(seed=1, requires_grad=True)
    b = [w.detach().clone().requires_grad_(True) for w in a]
    c = [w.detach().double().requires_grad_(True) for w in a]  # the float64 truth
    torch.stack([spectral_entropy(s) for s in singular_values(a)]).mean().backward()
    for ws in (b, c):
        torch.stack([spectral_entropy(torch.linalg.svdvals(w)) for w in ws]).mean().backward()
    for wa, wb, wc in zip(a, b, c):
        assert wa.grad.dtype == torch.float32 and wa.grad.abs().sum() > 0
        scale = float(wb.grad.abs().max())
        torch.testing.assert_close(wa.grad, wb.grad, rtol=1e-3, atol=1e-4 * scale)
        # as accurate as svdvals itself, also for the ill-conditioned square matrix
        err = float((wa.grad.double() - wc.grad).norm() / wc.grad.norm())
        assert err < 1e-5, (wa.shape, err)


def matrix_with_spectrum(s: torch.Tensor, m: int, n: int, g: torch.Generator) -> torch.Tensor:
    """An m x n float64 matrix with singular values s (random orthonormal U and V)."""
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return u @ torch.diag(s) @ v.T


def svd_test_matrices() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "tall": torch.randn(12, 5, generator=g, dtype=torch.float64),
        "wide": torch.randn(4, 9, generator=g, dtype=torch.float64),
        "square": torch.randn(7, 7, generator=g, dtype=torch.float64),
        "spanning 1..1e-6": matrix_with_spectrum(torch.logspace(0, -6, 8, dtype=torch.float64), 10, 8, g),
        "stacked tall": torch.randn(3, 6, 4, generator=g, dtype=torch.float64),  # a leading model axis
        "stacked wide": torch.randn(3, 4, 6, generator=g, dtype=torch.float64),
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(svd_test_matrices()))
def test_singular_values_function_matches_svdvals_and_autograd(name, dtype):
    """The custom autograd function (eigh of the float64 Gram forward, U diag(g) V^T backward)
    against torch.linalg.svdvals and its autograd gradient in float64, to 1e-5 relative.

    The one exception is inherent to the Gram: it resolves squared singular values only to
    ~n eps s_max^2. For the matrix spanning 1..1e-6 that leaves s = 1e-6 right to ~1e-4 (a
    float32 Gram would leave a floor of ~3e-4 s_max there, 300 times s), and the directions of
    its clustered small singular values to ~n eps s_max^2 / gap ~ 2e-5 (1e-4 checked; over 30
    random such matrices the worst was 4e-5)."""
    w = svd_test_matrices()[name].to(dtype).requires_grad_(True)
    ref_w = w.detach().double().requires_grad_(True)  # the float64 truth of the same matrix
    s = singular_values([w])[0]
    ref = torch.linalg.svdvals(ref_w)
    assert s.dtype == dtype and s.shape == ref.shape == (*w.shape[:-2], min(w.shape[-2:]))
    assert bool((s[..., :-1] >= s[..., 1:]).all())  # descending, like svdvals
    rel = ((s.double() - ref).abs() / ref).detach()
    ill = name.startswith("spanning")
    large = ref.detach() >= 1e-3 * ref.detach().amax(-1, keepdim=True)
    assert float(rel[large].max()) < 1e-5, (name, rel)
    assert float(rel.max()) < (1e-3 if ill else 1e-5), (name, rel)

    c = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (s.double() * c).sum().backward()
    (ref * c).sum().backward()
    assert w.grad.dtype == dtype and w.grad.shape == w.shape
    grad_err = float((w.grad.double() - ref_w.grad).norm() / ref_w.grad.norm())
    assert grad_err < (1e-4 if ill else 1e-5), (name, grad_err)
    if w.ndim == 3:  # each model of the stack gets its own gradient
        for i in range(w.shape[0]):
            e = float((w.grad[i].double() - ref_w.grad[i]).norm() / ref_w.grad[i].norm())
            assert e < 1e-5, (name, i, e)


def test_singular_values_function_of_non_finite_input_is_nan_not_an_error():
    g = torch.Generator().manual_seed(4)
    for bad in (float("nan"), float("inf"), -float("inf")):
        stack = torch.randn(3, 6, 4, generator=g)
        stack[1, 2, 3] = bad  # one model of a stack diverged
        stack.requires_grad_(True)
        s = singular_values([stack])[0]
        assert torch.isnan(s[1]).all(), bad
        for i in (0, 2):  # the other models are untouched
            torch.testing.assert_close(s[i], torch.linalg.svdvals(stack[i].detach()), rtol=1e-5, atol=1e-6)
        spectral_entropy(s).sum().backward()  # no exception in the backward either
        assert torch.isfinite(stack.grad[0]).all() and torch.isfinite(stack.grad[2]).all()
        for w in (torch.full((5, 3), bad), torch.full((3, 5), bad)):
            assert torch.isnan(singular_values([w])[0]).all()
        h = mean_spectral_entropy([stack.detach()], batch_dims=1)
        assert torch.isnan(h[1]) and torch.isfinite(h[[0, 2]]).all()


def test_mean_spectral_entropy_of_a_model_matches_svd():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab=13, layers=2))
    mats = weight_matrices(model)
    # embed, pos, 2 x (q, k, v, o, fc1, fc2), readout; no biases or LayerNorm vectors
    assert len(mats) == 2 + 2 * 6 + 1 and all(m.ndim == 2 for m in mats)
    ref = torch.stack([spectral_entropy(torch.linalg.svdvals(w)) for w in mats]).mean()
    h = mean_spectral_entropy(model)
    assert h.requires_grad
    torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-5)
    ranks = effective_ranks(model)
    assert len(ranks) == len(mats)
    for w, r in zip(mats, ranks):
        assert 1.0 <= r <= min(w.shape)


def test_spectral_entropy_rank_one_is_zero_and_identity_is_ln_n():
    assert float(spectral_entropy(torch.tensor([3.0, 0.0, 0.0, 0.0]))) == pytest.approx(0.0, abs=1e-7)
    u, v = torch.randn(6, 1), torch.randn(1, 9)
    assert float(spectral_entropy(torch.linalg.svdvals(u @ v))) == pytest.approx(0.0, abs=1e-4)
    assert float(spectral_entropy(singular_values([u @ v])[0])) == pytest.approx(0.0, abs=1e-4)
    for n in (1, 2, 5, 17):
        eye = torch.eye(n)
        assert float(spectral_entropy(torch.linalg.svdvals(eye))) == pytest.approx(math.log(n), abs=1e-6)
        assert float(spectral_entropy(singular_values([eye * 0.3])[0])) == pytest.approx(math.log(n), abs=1e-5)
    # p_i = s_i / sum(s): entropy is scale invariant and in nats
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])
    p = s / s.sum()
    assert float(spectral_entropy(s)) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-6)
    assert float(spectral_entropy(10 * s)) == pytest.approx(float(spectral_entropy(s)), rel=1e-6)


def test_non_finite_weights_give_nan_not_an_error():
    good = torch.randn(5, 3)
    bad = torch.full((4, 3), float("nan"))
    inf = torch.full((3, 8), float("inf"))
    s = singular_values([good, bad, inf])
    torch.testing.assert_close(s[0], torch.linalg.svdvals(good), rtol=1e-4, atol=1e-5)
    assert torch.isnan(s[1]).all() and torch.isnan(s[2]).all()


def test_presets():
    assert PRESETS == ("none", "wd", "ours")
    assert preset("none", "add") == RegConfig(wd=0.0, gamma=0.0, sigma=0.0)
    assert preset("wd", "sub") == RegConfig(wd=1.0, gamma=0.0, sigma=0.0)
    for task in ("add", "mul"):
        assert preset("ours", task) == RegConfig(wd=1.0, gamma=0.1, sigma=1e-2)
    for task in ("sub", "div", "sq", "quad"):
        assert preset("ours", task) == RegConfig(wd=1.0, gamma=0.1, sigma=1e-3)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("best", "add")


def test_train_config_takes_preset_and_overrides():
    cfg = TrainConfig(task="sub", p=7, preset="ours")
    assert (cfg.wd, cfg.gamma, cfg.sigma, cfg.layers, cfg.frac) == (1.0, 0.1, 1e-3, 2, 0.3)
    cfg = TrainConfig(task="add", p=7, preset="ours", gamma=0.0, wd=0.5)
    assert (cfg.wd, cfg.gamma, cfg.sigma) == (0.5, 0.0, 1e-2)
    cfg = TrainConfig(task="mul", p=7, preset="none", sigma=0.2)
    assert (cfg.wd, cfg.gamma, cfg.sigma) == (0.0, 0.0, 0.2)


@pytest.mark.parametrize("name", ["wd", "gamma", "sigma"])
def test_negative_regularizer_rejected(name):
    with pytest.raises(ValueError, match=f"{name} must be non-negative"):
        RegConfig(**{name: -0.1})
    with pytest.raises(ValueError, match=f"{name} must be non-negative"):
        TrainConfig(p=7, **{name: -0.1})


def test_unknown_noise_rejected():
    with pytest.raises(ValueError, match="unknown noise"):
        RegConfig(noise="laplace")


def noise_of(kind, sigma, seed=0):
    params = [torch.nn.Parameter(torch.zeros(200, 100)), torch.nn.Parameter(torch.zeros(300))]
    noise = WeightNoise(params, sigma, kind, torch.Generator().manual_seed(seed))
    noise.add()
    drawn = torch.cat([p.detach().flatten().clone() for p in params])
    noise.remove()
    return drawn, params


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_weight_noise_add_remove_restores_exactly(kind):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(13, 7)), torch.nn.Parameter(torch.randn(7))]
    before = [p.detach().clone() for p in params]
    noise = WeightNoise(params, 0.37, kind, torch.Generator().manual_seed(0))
    for _ in range(3):
        noise.add()
        assert all(not torch.equal(p, b) for p, b in zip(params, before))
        noise.remove()
        assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_gaussian_noise_has_std_sigma():
    drawn, params = noise_of("gaussian", 0.01)
    assert all(torch.count_nonzero(p) == 0 for p in params)  # removed again
    assert drawn.std().item() == pytest.approx(0.01, rel=0.03)
    assert abs(drawn.mean().item()) < 5 * 0.01 / math.sqrt(drawn.numel())
    assert drawn.abs().max().item() > 0.03  # unbounded: some draws beyond 3 sigma


def test_uniform_noise_lies_in_half_bin():
    sigma = 0.02
    drawn, _ = noise_of("uniform", sigma)
    assert drawn.abs().max().item() <= sigma / 2
    assert drawn.min().item() < -0.49 * sigma and drawn.max().item() > 0.49 * sigma
    assert drawn.std().item() == pytest.approx(sigma / math.sqrt(12), rel=0.03)


def test_weight_noise_is_seeded_and_fresh_each_step():
    a, _ = noise_of("gaussian", 0.1, seed=5)
    b, _ = noise_of("gaussian", 0.1, seed=5)
    c, _ = noise_of("gaussian", 0.1, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    params = [torch.nn.Parameter(torch.zeros(50))]
    noise = WeightNoise(params, 0.1, "uniform", torch.Generator().manual_seed(0))
    noise.add()
    first = params[0].detach().clone()
    noise.remove()
    noise.add()
    second = params[0].detach().clone()
    noise.remove()
    assert not torch.equal(first, second)


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_draw_noise_is_what_weight_noise_adds(kind):
    """The stacked engine draws its noise with draw_noise; WeightNoise adds the same draws, tensor by tensor."""
    shapes = [(13, 7), (7,)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    noise = WeightNoise(params, 0.3, kind, torch.Generator().manual_seed(9))
    noise.add()
    added = [p.detach().clone() for p in params]
    noise.remove()
    gen = torch.Generator().manual_seed(9)
    for shape, a in zip(shapes, added):
        assert torch.equal(draw_noise(shape, 0.3, kind, gen, torch.float32), a)


def test_penalty_of_the_paper_model_matches_svd_value_and_gradient():
    """The paper transformer's nine matrices (115x128, 128x128, 512x128, 128x512: Grams of two
    sizes, several shapes per batched eigh) give the penalty and its gradient of exact SVDs."""
    from mdlgrok.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig())
    params = [p for p in model.parameters() if p.ndim >= 2]
    mean_spectral_entropy(params).backward()
    ref_params = [p.detach().double().requires_grad_(True) for p in params]
    ref = torch.stack([spectral_entropy(torch.linalg.svdvals(p)) for p in ref_params]).mean()
    ref.backward()
    assert float(mean_spectral_entropy(params).detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    for p, r in zip(params, ref_params):
        assert float((p.grad.double() - r.grad).norm() / r.grad.norm()) < 1e-5
