"""The payload: every entry kind under every codec decodes to exactly the coarse-grained state
dict, and anything malformed is a ValueError with a clear message, never a wrong number."""

import os
import zlib
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mdlgrok.complexity import decode
from mdlgrok.complexity.coarse import dense_entry, lowrank_entry, raw_entry, split_rows, targets_of, zero_entry
from mdlgrok.complexity.moments import RowMoments, RowReads
from mdlgrok.complexity.payload import (
    CODEC_IDS,
    MAGIC,
    bin_width,
    decode_entries,
    encode,
    encode_all,
    fourier_basis,
    matrix_shape,
    state_dict_of,
)

CODECS = sorted(CODEC_IDS)


def sample_state() -> "OrderedDict[str, torch.Tensor]":
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(12, 10, generator=g)
    return OrderedDict(
        [
            ("dense32", torch.randn(5, 3, generator=g)),
            ("dense16", torch.randn(7, generator=g).half()),
            ("dense_bf16", torch.randn(4, 4, generator=g).bfloat16()),
            ("dense64", torch.randn(3, 2, generator=g).double()),
            ("scalar", torch.tensor(0.7)),
            ("lowrank", shared),
            ("conv", torch.randn(4, 2, 3, 3, generator=g)),  # lowrank on its 4 x 18 view
            ("zeros", torch.randn(6, generator=g)),
            ("int64", torch.arange(-5, 5)),
            ("int32", torch.tensor([2**31 - 1, -(2**31)], dtype=torch.int32)),
            ("int16", torch.tensor([-300, 7], dtype=torch.int16)),
            ("int8", torch.tensor([-128, 127], dtype=torch.int8)),
            ("uint8", torch.tensor([0, 255, 3], dtype=torch.uint8)),
            ("flags", torch.tensor([True, False, True])),
            ("raw_bf16", torch.randn(3, generator=g).bfloat16()),
            ("raw_f32", torch.randn(2, 2, generator=g)),
            ("empty", torch.zeros(0, 3)),
            ("tied", shared),  # the same tensor as "lowrank": an alias
        ]
    )


def sample_entries():
    targets = targets_of(sample_state())
    by = {t.name: t for t in targets}
    entries = []
    for t in targets:
        if t.name.startswith("dense") or t.name == "scalar":
            entries.append(dense_entry(t, -40))
        elif t.name == "lowrank":
            entries.append(lowrank_entry(t, 3, -40, -48))
        elif t.name == "conv":
            entries.append(lowrank_entry(t, 2, -32))
        elif t.name == "zeros":
            entries.append(zero_entry(t))
        else:
            entries.append(raw_entry(t))  # non-float, raw floats, the empty tensor, and the alias
    assert by["tied"].alias == list(by).index("lowrank")
    return entries


ENTRIES = sample_entries()
PAYLOADS = {codec: encode(ENTRIES, codec) for codec in CODECS}


def assert_same_state(a, b):
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


def test_sample_covers_every_kind():
    assert {e.kind for e in ENTRIES} == {"zero", "dense", "lowrank", "raw", "alias"}
    assert {e.dtype for e in ENTRIES if e.kind == "raw"} >= {torch.int64, torch.bool, torch.bfloat16}


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_every_kind(codec):
    payload = PAYLOADS[codec]
    assert payload[0] == MAGIC and payload[1] == CODEC_IDS[codec]
    entries, name = decode_entries(payload)
    assert name == codec
    assert [(e.name, e.kind, e.shape, e.dtype, e.rank, e.bins, e.alias) for e in entries] == [
        (e.name, e.kind, e.shape, e.dtype, e.rank, e.bins, e.alias) for e in ENTRIES
    ]
    assert_same_state(decode(payload), state_dict_of(ENTRIES))


def test_decoded_values_are_the_coarse_grained_originals():
    state, dec = sample_state(), decode(PAYLOADS["zstd"])
    for name in ("int64", "int32", "int16", "int8", "uint8", "flags", "raw_bf16", "raw_f32", "empty"):
        assert torch.equal(dec[name], state[name]), name  # raw entries are lossless
    assert dec["tied"] is dec["lowrank"]  # an alias decodes to the very tensor of its target
    assert torch.equal(dec["zeros"], torch.zeros(6))
    err = (dec["dense32"] - state["dense32"]).abs().max()
    assert err <= bin_width(-40) / 2 + 1e-7  # rounding to the nearest grid point
    for name in ("dense32", "dense16", "dense_bf16", "dense64", "scalar"):
        codes = dec[name].double() / bin_width(-40)
        assert torch.allclose(codes, codes.round(), atol=1e-2), name  # values on the grid (up to the dtype's precision)
    u, s, vh = torch.linalg.svd(state["lowrank"].double())
    best3 = (u[:, :3] * s[:3]) @ vh[:3]
    assert (dec["lowrank"].double() - best3).norm() < 0.02 * best3.norm()


@pytest.mark.parametrize("codec", CODECS)
def test_empty_state_dict_round_trips(codec):
    assert decode(encode([], codec)) == OrderedDict()


@st.composite
def random_entries(draw):
    """A random state dict, coarse-grained with random kinds, ranks and bins."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    state = OrderedDict()
    for i in range(draw(st.integers(1, 5))):
        shape = tuple(draw(st.lists(st.integers(1, 6), min_size=0, max_size=3)))
        dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64, torch.bool]))
        values = torch.from_numpy(rng.normal(0, 10 ** draw(st.integers(-3, 2)), size=shape))
        state[f"t{i}"] = values.to(dtype) if dtype.is_floating_point else (values * 10).to(dtype)
    if draw(st.booleans()):
        state["tied"] = state["t0"]
    rows = {}  # some tensors coded on a subset of their rows (the others decode to zero)
    for name, t in state.items():
        if t.ndim and t.shape[0] >= 2 and draw(st.booleans()):
            rows[name] = tuple(sorted(draw(st.sets(st.integers(0, t.shape[0] - 1), min_size=1))))
    moments = {}  # some matrices read as x @ W: coded transposed
    for name, t in state.items():
        if t.ndim == 2 and name not in rows and t.is_floating_point() and draw(st.booleans()):
            x = rng.normal(size=(3 * t.shape[0], t.shape[0]))
            moments[name] = RowMoments(x.T @ x / len(x) + 0.1 * np.eye(t.shape[0]))
    entries = []
    for t in targets_of(state, rows, moments):
        kind = draw(st.sampled_from(["dense", "lowrank", "zero", "raw"]))
        j = draw(st.integers(-60, 10))
        if not t.quantizable or kind == "raw":
            entries.append(raw_entry(t))
        elif kind == "lowrank" and t.is_matrix and t.max_lowrank() >= 1:
            fourier = draw(st.integers(2, t.coded_shape[0])) if draw(st.booleans()) else 0
            entries.append(
                lowrank_entry(t, draw(st.integers(1, t.max_lowrank())), j, draw(st.integers(-60, 10)), fourier=fourier)
            )
        elif kind == "zero":
            entries.append(zero_entry(t))
        else:
            m = matrix_shape(t.coded_shape)[0]
            entries.append(dense_entry(t, j, draw(st.integers(2, m)) if m >= 2 and draw(st.booleans()) else 0))
    return entries


@settings(max_examples=40, deadline=None)
@given(random_entries(), st.sampled_from(CODECS))
def test_decode_encode_is_state_dict_of(entries, codec):
    assert_same_state(decode(encode(entries, codec)), state_dict_of(entries))


@pytest.mark.parametrize("codec", CODECS)
def test_entries_on_some_rows_decode_with_the_other_rows_zero(codec):
    g = torch.Generator().manual_seed(1)
    state = OrderedDict([("pos", torch.randn(9, 6, generator=g)), ("table", torch.randn(8, 5, generator=g))])
    rows = {"pos": (0, 1, 2, 3), "table": (1, 4, 7)}
    dense, low = targets_of(state, rows)
    entries = [dense_entry(dense, -40), lowrank_entry(low, 2, -40)]
    assert [e.rows for e in entries] == [rows["pos"], rows["table"]] and len(entries[0].codes[0]) == 4 * 6
    decoded = decode(encode(entries, codec))
    assert_same_state(decoded, state_dict_of(entries))
    for name, keep in rows.items():
        other = [i for i in range(state[name].shape[0]) if i not in keep]
        assert torch.equal(decoded[name][other], torch.zeros(len(other), state[name].shape[1]))
    assert (decoded["pos"][:4] - state["pos"][:4]).abs().max() <= bin_width(-40) / 2 + 1e-7
    assert [e.rows for e in decode_entries(encode(entries, codec))[0]] == [rows["pos"], rows["table"]]


@pytest.mark.parametrize("codec", CODECS)
def test_a_transposed_entry_codes_the_transpose_and_decodes_in_the_tensors_layout(codec):
    """A kernel (inputs x outputs) read as x @ W: its codes (with Fourier rows) describe W^T."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 9, generator=g, dtype=torch.float64)
    (t,) = targets_of(OrderedDict([("kernel", w)]), moments={"kernel": RowMoments(np.eye(6))})
    assert t.transposed and t.coded_shape == (9, 6)
    entries = [dense_entry(t, -60, fourier=9)]
    (back,), _ = decode_entries(encode(entries, codec))
    assert back.transposed and back.fourier == 9 and back.coded_shape == (9, 6)
    decoded = decode(encode(entries, codec))["kernel"]
    assert decoded.shape == (6, 9) and decoded.is_contiguous()
    assert (decoded - w).abs().max() < bin_width(-60)
    low = decode(encode([lowrank_entry(t, 2, -120)], codec))["kernel"]
    u, s, vt = torch.linalg.svd(w)
    torch.testing.assert_close(low, (u[:, :2] * s[:2]) @ vt[:2], atol=1e-3, rtol=0)


def test_a_transposed_flag_on_a_vector_is_an_error():
    (t,) = targets_of(OrderedDict([("b", torch.ones(5))]))
    entry = dense_entry(t, -8)
    entry.transposed = True
    with pytest.raises(ValueError, match="transposed"):
        decode(encode([entry], "zstd"))


def test_a_row_list_past_the_tensor_is_an_error():
    (t,) = targets_of(OrderedDict([("pos", torch.ones(4, 3))]), {"pos": (0, 3)})
    entry = dense_entry(t, -8)
    entry.rows = (0, 4)  # row 4 of a 4-row tensor
    with pytest.raises(ValueError, match="row list"):
        decode(encode([entry], "zstd"))


@pytest.mark.parametrize("n", [1, 2, 5, 8, 113])
def test_fourier_basis_is_orthonormal(n):
    q = fourier_basis(n)
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)


@pytest.mark.parametrize("codec", CODECS)
def test_fourier_rows_decode_back_to_rows(codec):
    p = 13
    t_ = np.arange(p)
    table = np.stack([np.cos(2 * np.pi * 3 * t_ / p), np.sin(2 * np.pi * 5 * t_ / p), np.cos(2 * np.pi * t_ / p)], 1)
    state = OrderedDict([("emb", torch.from_numpy(np.concatenate([table, np.ones((2, 3))])))])  # 2 rows not residues
    (t,) = targets_of(state)
    assert t.fourier() == p  # a periodic table is sparse in the basis of its first p rows
    entry = dense_entry(t, -24, p)
    assert np.count_nonzero(entry.codes[0]) <= 6 + 6  # 3 columns x 2 coefficients, plus the 2 plain rows
    decoded = decode(encode([entry], codec))
    assert decode_entries(encode([entry], codec))[0][0].fourier == p
    assert (decoded["emb"] - state["emb"]).abs().max() <= 4 * bin_width(-24)


def periodic_table(p: int = 13, extra: int = 2) -> torch.Tensor:
    """A table of p residue rows, periodic along them, and `extra` rows that are not residues."""
    t_ = np.arange(p)
    table = np.stack([np.cos(2 * np.pi * 3 * t_ / p), np.sin(2 * np.pi * 5 * t_ / p), np.cos(2 * np.pi * t_ / p)], 1)
    return torch.from_numpy(np.concatenate([table, np.arange(3 * extra).reshape(extra, 3) + 1.0]))


@pytest.mark.parametrize("codec", CODECS)
def test_entries_of_one_name_on_their_own_rows_decode_to_their_sum(codec):
    """A tensor split into blocks of rows (split_rows): one entry per block, each on its own bin;
    the decoder adds them, and an alias of the tensor is the whole of it."""
    w = periodic_table()
    state = OrderedDict([("emb", w), ("tied", w)])
    first, alias, rest = split_rows(targets_of(state, moments=read_evenly(state)))
    assert (first.rows, rest.rows, rest.part, alias.alias) == (tuple(range(13)), (13, 14), True, 0)
    entries = [dense_entry(first, -24, 13), raw_entry(alias), dense_entry(rest, 8)]  # the rest: bin 2
    decoded = decode(encode(entries, codec))
    assert list(decoded) == ["emb", "tied"] and decoded["tied"] is decoded["emb"]
    assert (decoded["emb"][:13] - w[:13]).abs().max() <= 4 * bin_width(-24)
    torch.testing.assert_close(decoded["emb"][13:], torch.round(w[13:] / 2) * 2)  # each block its own bin
    assert_same_state(decoded, state_dict_of(entries))


def test_entries_of_one_name_that_differ_in_shape_are_an_error():
    (t,) = targets_of(OrderedDict([("w", torch.ones(4, 3))]))
    (u,) = targets_of(OrderedDict([("w", torch.ones(5, 3))]))
    with pytest.raises(ValueError, match="differ in shape"):
        decode(encode([dense_entry(t, 0), dense_entry(u, 0)], "zstd"))


def read_evenly(state) -> dict:
    """Moments as of tables whose rows the loss looks up equally often."""
    return {k: RowReads(np.ones(len(v))) for k, v in state.items() if v.ndim == 2}


def test_split_rows_leaves_alone_a_table_without_a_fourier_block_and_any_matrix_not_a_table():
    g = torch.Generator().manual_seed(3)
    random, residues = torch.randn(40, 30, generator=g), periodic_table(extra=0)
    state = OrderedDict([("random", random), ("all_residues", residues), ("vec", torch.ones(5))])
    targets = targets_of(state, moments=read_evenly(state))
    assert split_rows(targets) == targets  # no Fourier block, or one of every row
    (t,) = targets_of(OrderedDict([("conv", periodic_table())]))  # not read by lookups (reads unknown)
    assert t.fourier() == 13 and split_rows([t]) == [t]
    kernel = OrderedDict([("kernel", periodic_table().T.contiguous())])  # read as x @ W: coded as W^T
    (t,) = targets_of(kernel, moments={"kernel": RowMoments(np.eye(3))})
    assert t.transposed and split_rows([t]) == [t]


def test_a_split_target_patches_only_its_rows():
    w = periodic_table()
    state = OrderedDict([("emb", w)])
    first, rest = split_rows(targets_of(state, moments=read_evenly(state)))
    patched = rest.patched(np.zeros(rest.w.size))
    assert torch.equal(patched[:13], w[:13]) and torch.equal(patched[13:], torch.zeros(2, 3))
    assert torch.equal(rest.full(rest.w)[:13], torch.zeros(13, 3))  # the decoded block: zero elsewhere


def test_a_random_matrix_is_not_coded_in_the_fourier_basis():
    (t,) = targets_of({"w": torch.randn(40, 30, generator=torch.Generator().manual_seed(0))})
    assert t.fourier() == 0


def test_a_fourier_count_past_the_rows_is_an_error():
    (t,) = targets_of(OrderedDict([("emb", torch.randn(6, 3))]))
    entry = dense_entry(t, -8, 6)
    entry.fourier = 7
    with pytest.raises(ValueError, match="Fourier"):
        decode(encode([entry], "zstd"))


def test_encode_all_gives_every_codec_and_they_agree():
    payloads = encode_all(ENTRIES)
    assert set(payloads) == set(CODECS)
    ref = state_dict_of(ENTRIES)
    for payload in payloads.values():
        assert_same_state(decode(payload), ref)


def test_encode_all_skips_the_entropy_coder_when_codes_are_too_wide_for_it():
    t = targets_of({"w": torch.tensor([-1.0, 1.0, 0.0])})[0]
    wide = dense_entry(t, -8 * 30)  # bin 2^-30: codes +-2^30, beyond 24-bit probabilities
    payloads = encode_all([wide])
    assert set(payloads) == set(CODECS) - {"ans"}
    for payload in payloads.values():
        assert_same_state(decode(payload), state_dict_of([wide]))
    with pytest.raises(ValueError, match="too wide"):
        encode([wide], "ans")


# ---------------------------------------------------------------- corruption
@settings(max_examples=150, deadline=None)
@given(st.sampled_from(CODECS), st.data())
def test_any_single_bit_flip_is_an_error(codec, data):
    payload = PAYLOADS[codec]
    bit = data.draw(st.integers(0, 8 * len(payload) - 1))
    corrupt = bytearray(payload)
    corrupt[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(ValueError, match="payload"):
        decode(bytes(corrupt))


@pytest.mark.parametrize("codec", CODECS)
def test_every_truncation_is_an_error(codec):
    payload = PAYLOADS[codec]
    for cut in range(len(payload)):
        with pytest.raises(ValueError, match="payload"):
            decode(payload[:cut])


@pytest.mark.parametrize("codec", CODECS)
def test_truncated_body_with_a_recomputed_checksum_is_still_an_error(codec):
    # the structure checks, not only the CRC, reject a cut stream
    body = PAYLOADS[codec][:-4]
    for cut in range(2, len(body)):
        forged = body[:cut] + zlib.crc32(body[:cut]).to_bytes(4, "little")
        with pytest.raises(ValueError, match="payload"):
            decode(forged)


@pytest.mark.parametrize("codec", CODECS)
def test_appended_bytes_are_an_error(codec):
    with pytest.raises(ValueError, match="payload"):
        decode(PAYLOADS[codec] + b"\x00")


@pytest.mark.parametrize("bad", [b"", b"\xd1", b"\xd1\x00\x00\x00\x00", "a string", None, 12345])
def test_empty_short_or_wrong_type_is_an_error(bad):
    with pytest.raises(ValueError, match="empty or too short"):
        decode(bad)


def test_wrong_magic_or_codec_byte_is_an_error():
    payload = PAYLOADS["bz2"]
    for head in (b"\x00" + payload[1:2], payload[:1] + b"\x7f"):
        forged = head + payload[2:-4]
        forged += zlib.crc32(forged).to_bytes(4, "little")
        with pytest.raises(ValueError, match="not an mdlgrok description"):
            decode(forged)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=0, max_size=400))
def test_random_bytes_are_an_error(data):
    with pytest.raises(ValueError, match="payload"):
        decode(data)


def test_random_bytes_with_valid_magic_are_an_error():
    rng = np.random.default_rng(0)
    for codec in CODECS:
        for _ in range(20):
            data = bytes([MAGIC, CODEC_IDS[codec]]) + rng.bytes(int(rng.integers(4, 300)))
            with pytest.raises(ValueError, match="payload"):
                decode(data)


def test_os_random_payload_is_an_error():
    with pytest.raises(ValueError, match="payload"):
        decode(os.urandom(1000))
