"""The search's option statistics: GPTQ's bits and errors, exact on small matrices and on the
bins it rounds, estimated between them on large ones."""

import numpy as np
import pytest
import torch

from mdlgrok.complexity import search
from mdlgrok.complexity.coarse import gptq_codes, targets_of
from mdlgrok.complexity.codecs import empirical_bits
from mdlgrok.complexity.payload import matrix_shape


def correlated_target(m: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(600, 4)) @ rng.normal(size=(4, n)) + 0.1 * rng.normal(size=(600, n))
    h = x.T @ x / len(x)
    return targets_of({"w": torch.from_numpy(rng.laplace(size=(m, n)))}, moments={"w": h / (np.trace(h) / n)})[0]


def exact_stats(t, js, dtype=np.float64):
    w = t.w.reshape(matrix_shape(t.coded_shape))
    codes, errors = gptq_codes(w, js, t.whitened()[3], errors=True, dtype=dtype)
    return [(empirical_bits(c), e, bool(c.any())) for c, e in zip(codes, errors)]


def bins_of(t):
    return list(search._bin_range(float(np.abs(t.w).max())))


def test_a_small_matrix_gets_gptqs_exact_statistics_on_every_bin_up_to_the_high_rate_cut():
    t = correlated_target(16, 24)
    w = t.w.reshape(16, 24)
    js = bins_of(t)
    cut = search._high_rate_cut(w, js)
    got, exact = search._bin_stats(t, w, js, empirical_bits), exact_stats(t, js, np.float32)  # ranking only: float32
    assert 0 < cut < len(js)
    for (bits, err, nonzero), (b, e, z) in zip(got[cut:], exact[cut:]):
        assert bits == b and nonzero == z
        np.testing.assert_allclose(err, e, rtol=1e-6)
    for i, (bits, err, nonzero) in enumerate(got[:cut]):  # finer: one bit a weight per 8 grid steps, error / 4
        steps = js[cut] - js[i]
        assert bits == pytest.approx(exact[cut][0] + w.size * steps / 8) and nonzero
        np.testing.assert_allclose(err, exact[cut][1] * 4.0 ** (-steps / 8))


def test_the_high_rate_law_predicts_the_statistics_of_fine_bins():
    w = np.random.default_rng(2).normal(size=(300, 300))  # 90,000 entries: fine bins' entropy not saturated
    t = targets_of({"w": torch.from_numpy(w)})[0]
    js = bins_of(t)
    cut = search._high_rate_cut(w, js)
    assert empirical_bits(search.quantize(w, js[cut])) >= search.HIGH_RATE_BITS * w.size
    assert empirical_bits(search.quantize(w, js[cut + 1])) < search.HIGH_RATE_BITS * w.size
    got = search._bin_stats(t, w, js, empirical_bits)
    for j, (bits, err, _) in zip(js[:cut], got[:cut]):
        codes = search.quantize(w, j)
        if empirical_bits(codes) < 11 * w.size:  # the histogram of 90,000 codes holds up to ~11 bits
            assert bits == pytest.approx(empirical_bits(codes), rel=0.01)
        assert err.sum() == pytest.approx(((codes * search.bin_width(j) - w) ** 2).sum(), rel=0.02)


def test_a_large_matrix_gets_exact_statistics_on_some_bins_and_close_estimates_between(monkeypatch):
    monkeypatch.setattr(search, "ESTIMATE_FROM", 0)  # this matrix counts as large
    monkeypatch.setattr(search, "HIGH_RATE_BITS", np.inf)  # every bin computed
    t = correlated_target(48, 64, seed=3)
    js = bins_of(t)
    got = search._bin_stats(t, t.w.reshape(48, 64), js, empirical_bits)
    exact = exact_stats(t, js)
    same = [  # rounded by GPTQ (in float32: equal up to its rounding)
        i
        for i, (g, e) in enumerate(zip(got, exact))
        if g[0] == pytest.approx(e[0], rel=1e-4) and np.allclose(g[1], e[1], rtol=1e-4)
    ]
    assert 0 in same and len(js) - 1 in same and len(same) < len(js)  # some bins estimated
    assert all(i in same for i in range(0, len(js), search.EXACT_STRIDE // search.BIN_STRIDE))  # a factor 2 apart
    for (bits, err, _), (b, e, _) in zip(got, exact):
        assert bits == pytest.approx(b, rel=0.05)  # estimated above 2 bits a weight, exact below
        assert err.sum() == pytest.approx(e.sum(), rel=0.2)


def test_without_moments_the_statistics_are_those_of_rounding_to_nearest(monkeypatch):
    monkeypatch.setattr(search, "HIGH_RATE_BITS", np.inf)
    t = targets_of({"w": torch.randn(6, 7, dtype=torch.float64)})[0]
    js = bins_of(t)
    for j, (bits, err, nonzero) in zip(js, search._bin_stats(t, t.w.reshape(6, 7), js, empirical_bits)):
        codes = search.quantize(t.w.reshape(6, 7), j)
        assert bits == empirical_bits(codes) and nonzero == bool(codes.any())
        np.testing.assert_allclose(err, ((codes * search.bin_width(j) - t.w.reshape(6, 7)) ** 2).sum(1))


def test_a_row_sample_estimates_the_statistics_of_the_whole_matrix(monkeypatch):
    monkeypatch.setattr(search, "ESTIMATE_FROM", 0)
    monkeypatch.setattr(search, "SAMPLE_ROWS", 48)  # of 96 rows
    monkeypatch.setattr(search, "HIGH_RATE_BITS", np.inf)
    t = correlated_target(96, 64, seed=5)
    js = bins_of(t)
    got = search._bin_stats(t, t.w.reshape(96, 64), js, empirical_bits, sample=True)
    for (bits, err, _), (b, e, _) in zip(got, exact_stats(t, js)):
        if b > 2 * t.w.size:  # above 2 bits a weight; below, the ranking tolerates a rougher guess
            assert bits == pytest.approx(b, rel=0.05)
        assert err.sum() == pytest.approx(e.sum(), rel=0.25)


def test_gptqs_ratios_from_a_subset_of_the_sample_estimate_the_whole_matrix(monkeypatch):
    """GPTQ rounds an even half of the sample (its bits scaled up, its errors as a ratio to
    rounding to nearest): the statistics stay close to GPTQ's on the whole matrix."""
    monkeypatch.setattr(search, "ESTIMATE_FROM", 0)
    monkeypatch.setattr(search, "SAMPLE_ROWS", 96)  # of 192 rows
    monkeypatch.setattr(search, "GPTQ_RATIO_ENTRIES", 48 * 64)  # 48 of the 96
    monkeypatch.setattr(search, "HIGH_RATE_BITS", np.inf)
    t = correlated_target(192, 64, seed=5)
    js = bins_of(t)
    rounded = []
    monkeypatch.setattr(
        search, "_gptq_stats", lambda t_, x, *a, _f=search._gptq_stats: rounded.append(len(x)) or _f(t_, x, *a)
    )
    got = search._bin_stats(t, t.w.reshape(192, 64), js, empirical_bits, sample=True)
    assert set(rounded) == {48}
    low = 0
    for (bits, err, _), (b, e, _) in zip(got, exact_stats(t, js)):
        if b > 2 * t.w.size:  # from the ratio to rounding to nearest
            assert bits == pytest.approx(b, rel=0.05)
        else:  # the subset's own bits, scaled up to all rows
            assert bits == pytest.approx(b, rel=0.15)
            low += 1
        assert err.sum() == pytest.approx(e.sum(), rel=0.25)
    assert low >= 5


def test_ratio_rows_are_evenly_spaced_and_hold_enough_entries(monkeypatch):
    monkeypatch.setattr(search, "GPTQ_RATIO_ENTRIES", 1000)
    monkeypatch.setattr(search, "GPTQ_RATIO_ROWS", 4)
    rows = search._ratio_rows(np.zeros((256, 100)))
    assert len(rows) == 10 and rows[0] == 0 and rows[-1] == 255 and len(set(np.diff(rows))) <= 2
    assert len(search._ratio_rows(np.zeros((256, 1000)))) == 4  # wide: the least number of rows
    assert search._ratio_rows(np.zeros((8, 100))) is None  # fewer rows than needed: all of them


def test_a_matrix_of_fewer_rows_than_the_sample_is_rounded_whole(monkeypatch):
    monkeypatch.setattr(search, "ESTIMATE_FROM", 0)
    t = correlated_target(12, 64, seed=7)  # fewer rows than SAMPLE_ROWS
    js = bins_of(t)
    whole = search._bin_stats(t, t.w.reshape(12, 64), js, empirical_bits)
    sampled = search._bin_stats(t, t.w.reshape(12, 64), js, empirical_bits, sample=True)
    for (b1, e1, z1), (b2, e2, z2) in zip(whole, sampled):
        assert b1 == b2 and z1 == z2 and np.array_equal(e1, e2)


def test_the_row_sample_holds_enough_entries_for_the_entropy_of_fine_bins(monkeypatch):
    monkeypatch.setattr(search, "ESTIMATE_FROM", 1000)
    monkeypatch.setattr(search, "SAMPLE_ROWS", 8)
    assert search._sample_size(np.zeros((500, 10))) == 100  # 100 rows of 10: 1,000 entries
    assert search._sample_size(np.zeros((500, 1000))) == 8


def test_sampled_statistics_see_the_non_zero_codes_of_rows_left_out(monkeypatch):
    monkeypatch.setattr(search, "ESTIMATE_FROM", 0)
    monkeypatch.setattr(search, "SAMPLE_ROWS", 2)
    j = search.bin_index(1.0)
    for row in range(20):  # one large entry in any row: most of them are outside the sample of 2
        x = np.zeros((20, 4))
        x[row, 1] = 1.0
        t = targets_of({"w": torch.from_numpy(x)})[0]
        assert search._bin_stats(t, x, [j], empirical_bits, sample=True)[0][2]


def test_options_built_in_threads_are_those_built_one_at_a_time(monkeypatch):
    rng = np.random.default_rng(3)
    state = {"a": torch.from_numpy(rng.laplace(size=(20, 12))), "b": torch.from_numpy(rng.normal(size=(7,)))}
    fresh = [
        [correlated_target(24, 16, seed=1), *targets_of(state)],
        [correlated_target(24, 16, seed=1), *targets_of(state)],
    ]
    serial = search.all_options(fresh[0], threads=1)
    monkeypatch.setattr(search, "PARALLEL_FROM", 0)
    threaded = search.all_options(fresh[1], threads=2)
    assert serial == threaded == [search.options_for(t) for t in fresh[0]]
    assert all(len(hull) > 2 for hull in serial)


def test_the_zero_option_costs_the_whole_matrix_in_the_h_norm():
    t = correlated_target(9, 16)
    w = t.w.reshape(9, 16)
    (zero,) = search._zero_option(t)
    assert zero.bits == 0
    assert zero.err == pytest.approx(np.trace(w @ t.h @ w.T), rel=1e-10)


def prefixes(idx, n):
    """weight[r, i] = 1 for the first idx[r] + 1 of n rows: _prefix_bits of the prefixes."""
    return (np.arange(n)[None, :] <= np.asarray(idx)[:, None]).astype(np.float64)


@pytest.mark.parametrize("scale", [1.0, 1e4])  # 1e4: bins so fine that the values are counted one prefix at a time
def test_prefix_bits_are_the_empirical_bits_of_each_prefix_and_weights_count_rows_as_often(scale):
    rows = np.rint(np.random.default_rng(3).laplace(size=(40, 300)) * scale).astype(np.int64)
    idx = [0, 4, 19, 39]
    got = search._prefix_bits(rows, prefixes(idx, 40))
    np.testing.assert_allclose(got, [empirical_bits(rows[: k + 1]) for k in idx], rtol=1e-12)
    twice = search._prefix_bits(rows[:2], np.array([[2.0, 0.0], [1.0, 3.0]]))
    np.testing.assert_allclose(twice, [empirical_bits(rows[[0, 0]]), empirical_bits(rows[[0, 1, 1, 1]])], rtol=1e-12)


def test_components_of_many_factors_are_the_first_and_an_even_sample_covering_the_rest():
    comps, cover = search._components(2 * search.FACTOR_ROWS)
    assert list(comps) == list(range(2 * search.FACTOR_ROWS)) and set(cover) == {1}
    comps, cover = search._components(448)
    assert list(comps[: search.FACTOR_ROWS]) == list(range(search.FACTOR_ROWS))
    assert cover.sum() == 448 and list(np.cumsum(cover)[:-1]) == list(comps[1:])  # each stands for those up to the next
    assert set(np.diff(comps[search.FACTOR_ROWS :])) == {6} and len(comps) <= 2 * search.FACTOR_ROWS


def test_sampled_components_estimate_the_rank_k_options_of_all_components(monkeypatch):
    """Rank-k options of a matrix with input moments (up to rank 56), their factor statistics
    from every component against those from the first 8 and every 6th after: bits within 15%
    and errors within 10% from 2 bits a weight up to the high-rate law."""
    rng = np.random.default_rng(4)
    m = n = 120
    x = rng.normal(size=(2000, 6)) @ rng.normal(size=(6, n)) + 0.3 * rng.normal(size=(2000, n))
    h = x.T @ x / len(x)
    w = rng.normal(size=(m, 10)) @ rng.normal(size=(10, n)) + 0.2 * rng.laplace(size=(m, n))
    t = targets_of({"w": torch.from_numpy(w)}, moments={"w": h / (np.trace(h) / n)})[0]
    every = {(o.k, o.j, o.fourier): o for o in search._lowrank_options(t)}
    monkeypatch.setattr(search, "FACTOR_ROWS", 8)
    assert len(search._components(max(o.k for o in every.values()))[0]) < 20
    sampled = {(o.k, o.j, o.fourier): o for o in search._lowrank_options(t)}
    assert sampled.keys() == every.keys()
    mid = [key for key, o in every.items() if 2 <= o.bits / (o.k * (m + n)) < search.HIGH_RATE_BITS]
    assert len(mid) > len(every) // 5
    for key in mid:  # at lower rates, where most codes are 0, the sample's bits are rougher (up to 2x)
        assert sampled[key].bits == pytest.approx(every[key].bits, rel=0.15)
        assert sampled[key].err == pytest.approx(every[key].err, rel=0.1)


def test_a_row_sample_estimates_the_statistics_of_a_tall_factor(monkeypatch):
    """Rank-k options of a tall matrix (an embedding table): A's prefix bits and column errors
    from a sample of its rows, close to those of the whole A."""
    a = np.random.default_rng(9).laplace(size=(4000, 24)) * np.linspace(2, 0.2, 24)
    js, idx = bins_of(targets_of({"a": torch.from_numpy(a)})[0]), np.array([0, 3, 11, 23])
    exact = search._factor_stats(a, js, prefixes(idx, 24))
    monkeypatch.setattr(search, "ESTIMATE_FROM", 4000)
    monkeypatch.setattr(search, "SAMPLE_ROWS", 500)
    assert search._sampled(a) and len(search._sample_rows(a)) == 500
    for (bits, err, _), (b, e, _) in zip(search._factor_stats(a, js, prefixes(idx, 24)), exact):
        per_weight = b / ((idx + 1) * len(a))  # 2-6: below, a rougher guess ranks well; above, the high-rate law
        mid = (per_weight > 2) & (per_weight < search.HIGH_RATE_BITS)
        np.testing.assert_allclose(bits[mid], b[mid], rtol=0.05)
        np.testing.assert_allclose(err.sum(), e.sum(), rtol=0.1)
