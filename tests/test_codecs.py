"""Codecs: varints, zigzag, the ANS entropy coder, its per-array models, and the byte codecs."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mdlgrok.complexity.codecs import (
    BYTE_CODECS,
    CODEC_IDS,
    CODEC_NAMES,
    ENTROPY_CODEC,
    PROB_FLOOR_BITS,
    Reader,
    ans_decode,
    ans_encode,
    choose_model,
    codec_versions,
    empirical_bits,
    unzigzag,
    varint,
    zigzag,
)

FAST = settings(max_examples=60, deadline=None)


# ---------------------------------------------------------------- varint / zigzag
@FAST
@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_varint_round_trip(n):
    data = varint(n)
    r = Reader(data + b"tail")
    assert r.varint() == n
    assert r.pos == len(data)  # reads exactly its own bytes
    assert len(data) == max(1, -(-n.bit_length() // 7))  # LEB128: 7 bits per byte


@FAST
@given(st.integers(min_value=-(2**62), max_value=2**62))
def test_zigzag_round_trip(n):
    z = zigzag(n)
    assert z >= 0
    assert unzigzag(z) == n
    assert Reader(varint(z)).svarint() == n


def test_zigzag_interleaves_small_magnitudes():
    assert [zigzag(n) for n in (0, -1, 1, -2, 2)] == [0, 1, 2, 3, 4]


def test_varint_rejects_negative():
    with pytest.raises(ValueError, match="negative"):
        varint(-1)


def test_reader_errors_on_truncation_and_overlong_varints():
    with pytest.raises(ValueError, match="truncated"):
        Reader(b"").varint()
    with pytest.raises(ValueError, match="truncated"):
        Reader(varint(300)[:1]).varint()  # continuation bit set, next byte missing
    with pytest.raises(ValueError, match="truncated"):
        Reader(b"abc").take(4)
    with pytest.raises(ValueError, match="too long"):
        Reader(b"\xff" * 20).varint()


# ---------------------------------------------------------------- entropy coder
def _models(arrays):
    return [choose_model(a) if a.size else ("const", 0) for a in arrays]


def _int_array(draw, max_spread):
    n = draw(st.integers(min_value=0, max_value=200))
    kind = draw(st.sampled_from(["uniform", "laplace", "constant", "outliers"]))
    center = draw(st.integers(min_value=-max_spread, max_value=max_spread))
    rng = np.random.default_rng(draw(st.integers(min_value=0, max_value=2**32 - 1)))
    spread = draw(st.integers(min_value=1, max_value=max_spread))
    if kind == "uniform":
        a = rng.integers(-spread, spread + 1, size=n)
    elif kind == "laplace":
        a = np.rint(rng.laplace(0, spread / 8, size=n))
    elif kind == "constant":
        a = np.zeros(n)
    else:  # mostly zeros, a few extreme values
        a = np.where(rng.random(n) < 0.05, rng.choice([-spread, spread], size=n), 0)
    return (np.asarray(a, dtype=np.int64) + center).astype(np.int64)


@st.composite
def int_arrays(draw, max_spread=2**16):
    return [_int_array(draw, max_spread) for _ in range(draw(st.integers(min_value=0, max_value=4)))]


@FAST
@given(int_arrays(max_spread=2**10))
def test_ans_round_trip(arrays):
    models = _models(arrays)
    data = ans_encode(arrays, models)
    assert len(data) % 4 == 0
    out = ans_decode(data, [a.size for a in arrays], models)
    assert len(out) == len(arrays)
    for a, b in zip(arrays, out):
        assert b.dtype == np.int64
        np.testing.assert_array_equal(a, b)


@settings(max_examples=10, deadline=None)
@given(int_arrays(max_spread=2**18))
def test_ans_round_trip_wide_ranges(arrays):
    models = _models(arrays)
    out = ans_decode(ans_encode(arrays, models), [a.size for a in arrays], models)
    for a, b in zip(arrays, out):
        np.testing.assert_array_equal(a, b)


def test_ans_round_trip_at_the_widest_support():
    # every symbol of a 2^24-wide range needs a nonzero 24-bit probability: the limit of the coder
    a = np.array([0, 2**PROB_FLOOR_BITS - 1] + [3] * 20 + [-5 + 2**23])
    model = ("laplace", 0, 2**PROB_FLOOR_BITS - 1, 3.0, 1.0)
    np.testing.assert_array_equal(ans_decode(ans_encode([a], [model]), [a.size], [model])[0], a)


@pytest.mark.parametrize("codes", [np.array([-(2**23), 2**23]), np.array([0, 2**40]), np.array([2**31, 2**31 + 3])])
def test_choose_model_refuses_ranges_the_coder_cannot_represent(codes):
    with pytest.raises(ValueError, match="too wide for the entropy coder"):
        choose_model(codes)


def test_ans_empty_and_constant_arrays_cost_nothing():
    arrays = [np.zeros(0, dtype=np.int64), np.full(1000, -7, dtype=np.int64), np.full(3, 2**40, dtype=np.int64)]
    models = _models(arrays)
    assert models == [("const", 0), ("const", -7), ("const", 2**40)]
    data = ans_encode(arrays, models)
    out = ans_decode(data, [0, 1000, 3], models)
    for a, b in zip(arrays, out):
        np.testing.assert_array_equal(a, b)
    assert len(data) <= 8  # no symbols coded: an empty stream


def test_ans_decode_rejects_partial_words():
    with pytest.raises(ValueError, match="32-bit"):
        ans_decode(b"\x00" * 5, [1], [("laplace", 0, 3, 1.0, 1.0)])


def test_ans_size_is_near_the_empirical_entropy():
    rng = np.random.default_rng(0)
    a = np.rint(rng.laplace(0, 3, size=20_000)).astype(np.int64)
    bits = 8 * len(ans_encode([a], [choose_model(a)]))
    ideal = empirical_bits(a)
    assert ideal <= bits <= 1.02 * ideal + 512


# ---------------------------------------------------------------- model choice
def test_choose_model_constant():
    assert choose_model(np.full(10, 4)) == ("const", 4)
    assert choose_model(np.array([-3])) == ("const", -3)


def test_choose_model_prefers_a_histogram_for_a_few_arbitrary_symbols():
    # two far-apart spikes: a Laplace would waste bits on the gap, a histogram of 11 counts does not
    a = np.array([-5, 5] * 500)
    m = choose_model(a)
    assert m[0] == "hist"
    assert m[1] == -5
    np.testing.assert_array_equal(m[2], np.bincount(a + 5))


def test_choose_model_prefers_laplace_for_a_wide_peaked_distribution():
    # thousands of distinct values, few samples each: a histogram header would cost more than the data
    rng = np.random.default_rng(1)
    a = np.rint(rng.laplace(0, 2000, size=3000)).astype(np.int64)
    m = choose_model(a)
    assert m[0] == "laplace"
    assert (m[1], m[2]) == (a.min(), a.max())
    assert m[4] > 0


def test_choose_model_parameters_survive_float32():
    # the header stores mean and scale as float32: the model must already be float32-exact
    a = np.rint(np.random.default_rng(2).laplace(0.3, 777.7, size=500)).astype(np.int64)
    m = choose_model(a)
    assert m[0] == "laplace"
    assert float(np.float32(m[3])) == m[3] and float(np.float32(m[4])) == m[4]


def test_laplace_bits_of_a_hand_computed_case():
    from mdlgrok.complexity.codecs import _laplace_bits

    cdf = lambda x: 0.5 * math.exp(x) if x < 0 else 1 - 0.5 * math.exp(-x)  # noqa: E731  Laplace(0, 1)
    mass = cdf(1.5) - cdf(-1.5)  # truncated to [-1, 1]
    p0, p1 = (cdf(0.5) - cdf(-0.5)) / mass, (cdf(1.5) - cdf(0.5)) / mass
    want = -(3 * math.log2(p0) + 2 * math.log2(p1))
    assert _laplace_bits(np.array([0, 0, 1, 0, 1]), 0.0, 1.0, -1, 1) == pytest.approx(want, rel=1e-12)


def test_laplace_bits_floor_far_tails_at_the_coders_precision():
    from mdlgrok.complexity.codecs import _laplace_bits

    # a code 200 scales from the mean has probability ~e^-200: the coder spends 24 bits on it, no more
    assert _laplace_bits(np.array([200]), 0.0, 1.0, -200, 200) == pytest.approx(PROB_FLOOR_BITS)


@FAST
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 300),
    mean=st.floats(-20, 20),
    scale=st.floats(0.05, 50),
)
def test_laplace_bits_agree_with_scipys_laplace(seed, n, mean, scale):
    from scipy.stats import laplace

    from mdlgrok.complexity.codecs import _laplace_bits

    codes = np.rint(np.random.default_rng(seed).laplace(mean, scale, size=n)).astype(np.int64)
    lo, hi = int(codes.min()) - 1, int(codes.max()) + 1
    cdf = lambda x: laplace.cdf(x, loc=mean, scale=scale)  # noqa: E731
    p = (cdf(codes + 0.5) - cdf(codes - 0.5)) / (cdf(hi + 0.5) - cdf(lo - 0.5))
    want = float(-np.log2(np.maximum(p, 2.0**-PROB_FLOOR_BITS)).sum())
    assert _laplace_bits(codes, mean, scale, lo, hi) == pytest.approx(want, rel=1e-9, abs=1e-6)


def test_empirical_bits():
    assert empirical_bits(np.zeros(0, dtype=np.int64)) == 0.0
    assert empirical_bits(np.full(50, 3)) == 0.0
    assert empirical_bits(np.array([0, 1] * 8)) == pytest.approx(16.0)
    assert empirical_bits(np.array([0, 1, 2, 3])) == pytest.approx(8.0)


# ---------------------------------------------------------------- byte codecs
@pytest.mark.parametrize("name", sorted(BYTE_CODECS))
@settings(max_examples=25, deadline=None)
@given(data=st.binary(max_size=3000))
def test_byte_codec_round_trip(name, data):
    compress, decompress = BYTE_CODECS[name]
    assert decompress(compress(data)) == data


@pytest.mark.parametrize("name", sorted(BYTE_CODECS))
def test_byte_codec_round_trip_large_and_compressible(name):
    data = bytes(range(256)) * 400 + b"\x00" * 100_000
    compress, decompress = BYTE_CODECS[name]
    packed = compress(data)
    assert decompress(packed) == data
    assert len(packed) < len(data) // 20


def test_codec_ids_and_versions_cover_every_codec():
    assert set(CODEC_IDS) == set(BYTE_CODECS) | {ENTROPY_CODEC}
    assert len(set(CODEC_IDS.values())) == len(CODEC_IDS)
    assert all(CODEC_NAMES[i] == name for name, i in CODEC_IDS.items())
    versions = codec_versions()
    assert set(versions) == set(CODEC_IDS)
    for name in BYTE_CODECS:
        assert "level" in versions[name] or "preset" in versions[name], versions[name]
    assert "constriction" in versions[ENTROPY_CODEC]


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 20_000), st.integers(0, 2**31 - 1))
def test_lzma_with_an_input_sized_dictionary_writes_preset_9es_stream(n, seed):
    import lzma

    from mdlgrok.complexity.codecs import LZMA_FILTERS

    data = np.random.default_rng(seed).laplace(scale=3, size=n).astype(np.int8).tobytes()
    compress, decompress = BYTE_CODECS["lzma"]
    assert compress(data) == lzma.compress(data, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
    assert decompress(compress(data)) == data
