"""Description lengths and bounds against values computed by hand, and their properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mdlgrok.mdl import (
    BOUNDS,
    CATONI_GRID,
    binary_kl,
    catoni_bound,
    data_bits,
    description_bits,
    kl_bound,
    kl_rhs,
    nonvacuous_bits,
    occam_bound,
    prefix_free_bits,
    truth_table_bits,
)

LN2 = math.log(2)
FAST = settings(max_examples=60, deadline=None)
errs = st.floats(0.0, 0.5)
ks = st.floats(0.0, 1e5)
ns = st.integers(1, 100_000)


# --- description lengths ---------------------------------------------------------------------


def test_data_bits_by_hand():
    assert data_bits(LN2, 10) == pytest.approx(10.0)  # 10 labels at 1 bit each
    assert data_bits(0.0, 2553) == 0.0
    assert data_bits(0.5, 2553) == pytest.approx(2553 * 0.5 / 0.6931471805599453)  # 1841.6 bits


def test_description_bits_is_model_plus_data():
    assert description_bits(8 * 27_000, LN2 / 2, 2553) == pytest.approx(216_000 + 2553 / 2)


def test_truth_table_bits_p113():
    # 113^2 = 12769 entries, log2(113) = 6.8201789624 bits each -> 87,086.9 bits (87 kbit)
    assert truth_table_bits(113) == pytest.approx(12769 * 6.820178962415188)
    assert 87_000 < truth_table_bits(113) < 87_100
    assert truth_table_bits(2) == 4.0


def test_prefix_free_bits_by_hand():
    assert prefix_free_bits(1) == 1.0  # 1 + 2 log2 1
    assert prefix_free_bits(1024) == 1024 + 2 * 10


# --- bounds by hand --------------------------------------------------------------------------


def test_occam_by_hand():
    # K = 1000 bits, n = 2500, delta = 0.05: sqrt((1000 ln2 + ln 20) / 5000) = sqrt(696.143 / 5000)
    expected = math.sqrt((1000 * 0.6931471805599453 + 2.995732273553991) / 5000)
    assert occam_bound(0.0, 1000, 2500, 0.05) == pytest.approx(expected)
    assert expected == pytest.approx(0.37313, abs=1e-5)
    assert occam_bound(0.1, 1000, 2500, 0.05) == pytest.approx(0.1 + expected)
    # raw value, not clipped: K = 2e5 bits over 2553 examples is far above 1
    assert occam_bound(0.0, 2e5, 2553) == pytest.approx(math.sqrt((2e5 * LN2 + math.log(20)) / 5106))
    assert occam_bound(0.0, 2e5, 2553) > 5


def test_kl_by_hand_at_zero_train_error():
    # K' = 1000 + 2 log2 1000 = 1019.93 bits; rhs = (K' ln2 + ln(2 sqrt(2500) / 0.05)) / 2500
    #    = (706.96 + ln 2000) / 2500 = 0.28583 nats; kl(0 || e) = -ln(1 - e) -> e = 1 - exp(-rhs)
    k_prime = 1000 + 2 * math.log2(1000)
    rhs = (k_prime * LN2 + math.log(2000)) / 2500
    assert kl_rhs(1000, 2500, 0.05) == pytest.approx(rhs)
    assert kl_bound(0.0, 1000, 2500, 0.05) == pytest.approx(1 - math.exp(-rhs))
    assert kl_bound(0.0, 1000, 2500, 0.05) == pytest.approx(0.24861, abs=1e-5)


def test_kl_by_hand_nonzero_train_error():
    q, e = 0.1, kl_bound(0.1, 1000, 2500, 0.05)
    rhs = kl_rhs(1000, 2500, 0.05)
    # q ln(q/e) + (1-q) ln((1-q)/(1-e)) = rhs at the returned e
    assert q * math.log(q / e) + (1 - q) * math.log((1 - q) / (1 - e)) == pytest.approx(rhs, rel=1e-9)
    assert q < e < 1


def test_catoni_by_hand_at_zero_train_error():
    # at train_err = 0 every C gives (1 - exp(-r)) / (1 - exp(-C)); the largest C = 256 wins
    # and 1 - exp(-256) = 1, so the bound is 1 - exp(-r), r = (K' ln2 + ln 20 + ln 65) / n
    r = ((1000 + 2 * math.log2(1000)) * LN2 + math.log(20) + math.log(65)) / 2500
    assert len(CATONI_GRID) == 65 and CATONI_GRID.max() == 256
    assert catoni_bound(0.0, 1000, 2500, 0.05) == pytest.approx(1 - math.exp(-r))


def test_catoni_single_c_by_hand():
    # one C = 2: (1 - exp(-2 * 0.1 - r)) / (1 - exp(-2)), r = (K' ln2 + ln 20 + ln 1) / n
    r = ((1000 + 2 * math.log2(1000)) * LN2 + math.log(20)) / 2500
    expected = (1 - math.exp(-0.2 - r)) / (1 - math.exp(-2))
    assert catoni_bound(0.1, 1000, 2500, 0.05, grid=[2.0]) == pytest.approx(expected)


def test_paper_regime_is_vacuous():
    # K ~ 2e5 bits (25 kB), n ~ 2553 (20% of 113^2): no bound beats chance 1 - 1/113
    chance = 1 - 1 / 113
    for k in (1.2e5, 2e5):
        assert occam_bound(0.0, k, 2553) > 1
        assert kl_bound(0.0, k, 2553) > chance
        assert catoni_bound(0.0, k, 2553) > chance
    assert kl_bound(0.0, 2e5, 2553) == 1.0
    assert catoni_bound(0.0, 2e5, 2553) == 1.0
    # the gap: non-vacuous (below chance) only under ~17k bits, i.e. ~2 kB
    assert 15_000 < nonvacuous_bits(0.0, 2553, threshold=chance) < 20_000


def test_train_err_one_is_vacuous():
    assert kl_bound(1.0, 10, 1000) == 1.0
    assert catoni_bound(1.0, 10, 1000) == 1.0


# --- properties ------------------------------------------------------------------------------


@FAST
@given(q=errs, k=ks, n=ns)
def test_kl_bound_solves_kl_equation(q, k, n):
    e, rhs = kl_bound(q, k, n), kl_rhs(k, n)
    assert q <= e <= 1
    if e < 1 - 1e-6:
        assert binary_kl(q, e) == pytest.approx(rhs, rel=1e-6, abs=1e-12)


@FAST
@given(q=errs, k=ks, dk=st.floats(0.0, 1e4), n=ns, dn=st.integers(0, 10_000))
def test_kl_bound_monotone_in_k_and_n(q, k, dk, n, dn):
    assert kl_bound(q, k, n) <= kl_bound(q, k + dk, n) + 1e-12
    assert kl_bound(q, k, n + dn) <= kl_bound(q, k, n) + 1e-12


@FAST
@given(q=st.floats(0.0, 0.1), k=st.floats(100, 1e4), n=st.integers(1_000, 100_000))
def test_kl_tighter_than_occam_when_both_nonvacuous(q, k, n):
    occam, kl = occam_bound(q, k, n), kl_bound(q, k, n)
    if occam < 1 and kl < 1:
        assert kl <= occam


@FAST
@given(q=errs, k=ks, dk=st.floats(0.0, 1e4), n=ns)
def test_catoni_in_range_and_monotone_in_k(q, k, dk, n):
    b = catoni_bound(q, k, n)
    assert q - 1e-12 <= b <= 1
    assert b <= catoni_bound(q, k + dk, n) + 1e-12


@FAST
@given(
    q=st.floats(0.0, 0.3), n=st.integers(100, 100_000), bound=st.sampled_from(BOUNDS), threshold=st.floats(0.5, 0.99)
)
def test_nonvacuous_bits_is_the_crossing(q, n, bound, threshold):
    f = {"occam": occam_bound, "kl": kl_bound, "catoni": catoni_bound}[bound]
    k = nonvacuous_bits(q, n, threshold=threshold, bound=bound)
    if k == 0:
        assert f(q, 0.0, n) >= threshold
    else:
        assert f(q, k, n) < threshold
        assert f(q, k * 1.01 + 1e-6, n) >= threshold


def test_nonvacuous_bits_zero_when_train_error_above_threshold():
    assert nonvacuous_bits(0.6, 1000, threshold=0.5) == 0.0


def test_nonvacuous_bits_occam_by_hand():
    # occam = 1 at train_err 0: K ln2 + ln 20 = 2n -> K = (2 * 2553 - ln 20) / ln 2 = 7362.1 bits
    assert nonvacuous_bits(0.0, 2553, bound="occam") == pytest.approx((5106 - math.log(20)) / LN2, rel=1e-6)


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("f", [occam_bound, kl_bound, catoni_bound])
@pytest.mark.parametrize(
    "args",
    [
        (-0.1, 10, 100, 0.05),
        (1.1, 10, 100, 0.05),
        (math.nan, 10, 100, 0.05),
        (0.0, -1, 100, 0.05),
        (0.0, math.inf, 100, 0.05),
        (0.0, 10, 0, 0.05),
        (0.0, 10, 100, 0.0),
        (0.0, 10, 100, 1.0),
    ],
)
def test_bounds_reject_bad_inputs(f, args):
    with pytest.raises(ValueError):
        f(*args)


def test_other_functions_reject_bad_inputs():
    for call in (
        lambda: data_bits(-1.0, 10),
        lambda: data_bits(1.0, 0),
        lambda: description_bits(-1, 0.1, 10),
        lambda: truth_table_bits(1),
        lambda: truth_table_bits(11.5),
        lambda: prefix_free_bits(0.5),
        lambda: nonvacuous_bits(0.0, 100, bound="pac"),
        lambda: nonvacuous_bits(0.0, 100, threshold=1.5),
        lambda: nonvacuous_bits(0.0, 0),
        lambda: catoni_bound(0.0, 10, 100, grid=[0.0]),
    ):
        with pytest.raises(ValueError):
            call()
