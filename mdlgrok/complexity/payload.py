"""The byte format of a coarse-grained network, and its decoder.

A payload is self-contained: ``decode(payload)`` rebuilds the state dict from the bytes
alone. Layout::

    byte 0      format version (MAGIC)
    byte 1      codec id (zstd, bz2, lzma, ans)
    body        byte codecs: compress(varint len(header) + header + code width + code planes)
                ans: varint len(h) + h + ANS words, h = byte codec id + compress(header + models)
    4 bytes     CRC32 of everything before it, so that corruption is an error, never a number

The header names every entry with its dtype, shape and kind:
  zero     all zeros;
  dense    integer codes c, values c * delta;
  lowrank  rank k, codes A (m x k) and B (k x n), values (A * dA) @ (B * dB) (float64, then cast);
  raw      the tensor's own bytes (non-float tensors);
  alias    the same tensor as an earlier entry (tied weights).
Bins lie on the grid delta = 2 ** (j / BIN_STEPS) and are stored as the integer j.
A dense or lowrank entry may cover only some rows of its tensor (the rows an embedding
table's lookups reach): its kind byte then has ROWS_FLAG set and the row indices follow
(count, then gaps); the codes describe those rows and every other row is zero. Several
entries may share a name, each covering its own rows (rows that need a bin of their own):
the decoder adds them.
A dense matrix, or the A factor of a lowrank entry, may store its first f rows as
coefficients of the orthonormal real Fourier basis along the rows (``fourier_basis``): the
kind byte then has FOURIER_FLAG set and f follows; the decoder turns them back into rows.
A dense or lowrank entry of a matrix may code its transpose (a weight applied as x @ W, whose
rows are the inputs): its kind byte then has TRANSPOSED_FLAG set, the codes (and Fourier rows)
describe W^T, and the decoder transposes the result.
Tables indexed by a residue mod p (embeddings and readouts of modular arithmetic) are
sparse in that basis once a network has grokked (Nanda et al. 2023).
"""

from __future__ import annotations

import functools
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from mdlgrok.complexity.codecs import (
    BYTE_CODECS,
    CODEC_IDS,
    CODEC_NAMES,
    ENTROPY_CODEC,
    Reader,
    ans_decode,
    ans_encode,
    choose_model,
    varint,
    zigzag,
)

MAGIC = 0xD1
BIN_STEPS = 8  # bins on a grid of 2^(1/8)
KINDS = ("zero", "dense", "lowrank", "raw", "alias")
ROWS_FLAG = 0x80  # on the kind byte: the entry covers only the listed rows
FOURIER_FLAG = 0x40  # on the kind byte: the first f rows are Fourier coefficients
TRANSPOSED_FLAG = 0x20  # on the kind byte: the codes describe the matrix's transpose
KIND_MASK = 0x1F
DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)


def bin_width(j: int) -> float:
    return 2.0 ** (j / BIN_STEPS)


@dataclass
class Entry:
    """One state-dict entry, coarse-grained."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str
    codes: tuple[np.ndarray, ...] = ()  # int64; dense: (flat,), lowrank: (A, B) flattened
    bins: tuple[int, ...] = ()  # exponents j, one per code array
    rank: int = 0
    raw: bytes = b""
    alias: int = -1
    matrix: tuple[int, int] = field(default=(0, 0), repr=False)  # (m, n) view for lowrank
    rows: tuple[int, ...] = ()  # dense/lowrank: the rows the codes cover (empty: all); the rest are zero
    fourier: int = 0  # dense/lowrank: the first `fourier` rows of the matrix (of A) are Fourier coefficients
    transposed: bool = False  # dense/lowrank of a matrix: the codes describe its transpose (no rows list)

    def __post_init__(self):
        if self.kind == "lowrank" and self.matrix == (0, 0):
            self.matrix = matrix_shape(self.coded_shape)

    @property
    def coded_shape(self) -> tuple[int, ...]:
        """The shape the codes describe: the listed rows, the whole tensor, or its transpose."""
        if self.transposed:
            return self.shape[::-1]
        return (len(self.rows), *self.shape[1:]) if self.rows else self.shape


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view of a tensor: (first dim, product of the rest); (1, 1) for a scalar."""
    return (shape[0], int(np.prod(shape[1:], dtype=np.int64))) if shape else (1, 1)


@functools.lru_cache(maxsize=32)
def fourier_basis(n: int) -> np.ndarray:
    """The orthonormal real Fourier basis of length n as rows (n x n): constant, then cos and sin
    of every frequency 1 .. (n-1)//2, then (-1)^t when n is even. Coefficients c = Q x, x = Q^T c."""
    t = np.arange(n)
    rows = [np.full(n, 1 / np.sqrt(n))]
    for f in range(1, (n - 1) // 2 + 1):
        rows += [np.sqrt(2 / n) * np.cos(2 * np.pi * f * t / n), np.sqrt(2 / n) * np.sin(2 * np.pi * f * t / n)]
    if n % 2 == 0:
        rows.append((-1.0) ** t / np.sqrt(n))
    basis = np.stack(rows)
    basis.flags.writeable = False  # shared by the cache
    return basis


def from_fourier(x: np.ndarray, f: int) -> np.ndarray:
    """x with its first f rows turned from Fourier coefficients back into rows (f = 0: x)."""
    if not f:
        return x
    return np.concatenate([fourier_basis(f).T @ x[:f], x[f:]])


def entry_tensor(e: Entry) -> torch.Tensor:
    """The tensor an entry stands for; the single definition used by search and decoder."""
    if e.rows and e.kind in ("dense", "lowrank"):
        full = torch.zeros(e.shape, dtype=e.dtype)
        full[list(e.rows)] = _coded_tensor(e, e.coded_shape)
        return full
    if e.transposed and e.kind in ("dense", "lowrank"):
        return _coded_tensor(e, e.coded_shape).T.contiguous()
    return _coded_tensor(e, e.shape)


def _coded_tensor(e: Entry, shape: tuple[int, ...]) -> torch.Tensor:
    if e.kind == "zero":
        return torch.zeros(e.shape, dtype=e.dtype)
    if e.kind == "dense":
        values = e.codes[0].astype(np.float64).reshape(matrix_shape(e.coded_shape))
        values *= bin_width(e.bins[0])  # in place: the same products, one array less
        return torch.from_numpy(from_fourier(values, e.fourier).reshape(shape)).to(e.dtype)
    if e.kind == "lowrank":
        (m, n), k = e.matrix, e.rank
        a = from_fourier(e.codes[0].reshape(m, k).astype(np.float64) * bin_width(e.bins[0]), e.fourier)
        b = e.codes[1].reshape(k, n).astype(np.float64) * bin_width(e.bins[1])
        return torch.from_numpy((a @ b).reshape(shape)).to(e.dtype)
    if e.kind == "raw":
        flat = torch.frombuffer(bytearray(e.raw), dtype=torch.uint8) if e.raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(e.dtype).reshape(e.shape).clone()
    raise ValueError(f"unknown entry kind {e.kind!r}")


def add_block(state: dict[str, torch.Tensor], name: str, t: torch.Tensor) -> None:
    """Put t under name in state, added to what is there: blocks of rows of one tensor (each
    zero outside its rows) make up the tensor. The single rule used by search and decoder."""
    state[name] = state[name] + t if name in state else t


def state_dict_of(entries: list[Entry]) -> OrderedDict[str, torch.Tensor]:
    """The state dict of a list of entries, in their order: entries of one name (blocks of rows
    of one tensor, each zero outside its rows) add up; an alias is the whole tensor of the entry
    it names."""
    sums: dict[str, torch.Tensor] = {}
    for e in entries:
        if e.kind == "alias":
            continue
        t = entry_tensor(e)
        if e.name in sums and (sums[e.name].shape, sums[e.name].dtype) != (t.shape, t.dtype):
            raise ValueError(f"payload is corrupt (entries named {e.name!r} differ in shape or dtype)")
        add_block(sums, e.name, t)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for e in entries:
        source = e
        while source.kind == "alias":  # aliases point to earlier entries (checked on reading)
            source = entries[source.alias]
        out[e.name] = sums[source.name]
    return out


# ---------------------------------------------------------------- header
def _header(entries: list[Entry]) -> bytes:
    h = bytearray(varint(len(entries)))
    for e in entries:
        name = e.name.encode()
        coded = e.kind in ("dense", "lowrank")
        rows, fourier, transposed = (e.rows, e.fourier, e.transposed) if coded else ((), 0, False)
        flags = (ROWS_FLAG if rows else 0) | (FOURIER_FLAG if fourier else 0) | (TRANSPOSED_FLAG if transposed else 0)
        h += varint(len(name)) + name + bytes([DTYPES.index(e.dtype), KINDS.index(e.kind) | flags])
        h += varint(len(e.shape)) + b"".join(varint(d) for d in e.shape)
        if rows:
            h += varint(len(rows)) + b"".join(varint(g) for g in np.diff(rows, prepend=-1) - 1)
        if fourier:
            h += varint(fourier)
        if e.kind == "dense":
            h += varint(zigzag(e.bins[0]))
        elif e.kind == "lowrank":
            h += varint(e.rank) + varint(zigzag(e.bins[0])) + varint(zigzag(e.bins[1]))
        elif e.kind == "raw":
            h += varint(len(e.raw)) + e.raw
        elif e.kind == "alias":
            h += varint(e.alias)
    return bytes(h)


def _code_sizes(e: Entry) -> list[int]:
    """Lengths of the code arrays of an entry, from its header alone."""
    if e.kind == "dense":
        return [int(np.prod(e.coded_shape, dtype=np.int64))]
    if e.kind == "lowrank":
        m, n = e.matrix
        return [m * e.rank, e.rank * n]
    return []


def _read_header(r: Reader) -> list[Entry]:
    entries = []
    for i in range(r.varint()):
        name = r.take(r.varint()).decode()
        dtype_id, kind_byte = r.take(2)
        kind_id, has_rows, has_fourier = (
            kind_byte & KIND_MASK,
            bool(kind_byte & ROWS_FLAG),
            bool(kind_byte & FOURIER_FLAG),
        )
        transposed = bool(kind_byte & TRANSPOSED_FLAG)
        if (
            dtype_id >= len(DTYPES)
            or kind_id >= len(KINDS)
            or ((has_rows or has_fourier or transposed) and KINDS[kind_id] not in ("dense", "lowrank"))
        ):
            raise ValueError("payload is corrupt (unknown dtype or kind)")
        shape = tuple(r.varint() for _ in range(r.varint()))
        if transposed and (len(shape) != 2 or has_rows):
            raise ValueError("payload is corrupt (a transposed entry must be a matrix without a row list)")
        e = Entry(name, shape, DTYPES[dtype_id], KINDS[kind_id], transposed=transposed)
        if has_rows:
            e.rows = _read_rows(r, shape)
        if has_fourier:
            e.fourier = r.varint()
            if not shape or not 2 <= e.fourier <= e.coded_shape[0]:
                raise ValueError("payload is corrupt (Fourier rows)")
        if e.kind == "dense":
            e.bins = (r.svarint(),)
        elif e.kind == "lowrank":
            e.rank, e.bins = r.varint(), (r.svarint(), r.svarint())
            e.matrix = matrix_shape(e.coded_shape)
        elif e.kind == "raw":
            e.raw = r.take(r.varint())
        elif e.kind == "alias" and not 0 <= (alias := r.varint()) < i:
            raise ValueError("payload is corrupt (alias to a later entry)")
        elif e.kind == "alias":
            e.alias = alias
        entries.append(e)
    return entries


def _read_rows(r: Reader, shape: tuple[int, ...]) -> tuple[int, ...]:
    count = r.varint()
    if not shape or count == 0:
        raise ValueError("payload is corrupt (row list)")
    rows = np.cumsum([r.varint() + 1 for _ in range(count)]) - 1
    if rows[-1] >= shape[0]:
        raise ValueError("payload is corrupt (row list)")
    return tuple(int(i) for i in rows)


# ---------------------------------------------------------------- code streams
def _planes(codes: np.ndarray) -> bytes:
    """Zigzag codes as byte planes of the narrowest width: byte compressors like that layout."""
    z = (codes << 1) ^ (codes >> 63) if codes.size else codes
    top = int(z.max()) if z.size else 0
    width = next(w for w in (1, 2, 4, 8) if top < 256**w)
    return bytes([width]) + z.astype(f"<u{width}").view(np.uint8).reshape(-1, width).T.tobytes()


def _unplanes(r: Reader, total: int) -> np.ndarray:
    width = r.take(1)[0]
    if width not in (1, 2, 4, 8):
        raise ValueError("payload is corrupt (code width)")
    raw = np.frombuffer(r.take(total * width), dtype=np.uint8).reshape(width, total).T.copy()
    z = raw.view(f"<u{width}").reshape(-1).astype(np.int64)
    return (z >> 1) ^ -(z & 1)


def _models_bytes(models: list[tuple]) -> bytes:
    out = bytearray()
    for m in models:
        out += bytes([("const", "hist", "laplace").index(m[0])])
        if m[0] == "const":
            out += varint(zigzag(m[1]))
        elif m[0] == "hist":
            out += varint(zigzag(m[1])) + varint(len(m[2])) + b"".join(varint(int(c)) for c in m[2])
        else:
            out += varint(zigzag(m[1])) + varint(zigzag(m[2])) + np.array(m[3:], dtype="<f4").tobytes()
    return bytes(out)


def _read_models(r: Reader, n: int) -> list[tuple]:
    models = []
    for _ in range(n):
        kind = r.take(1)[0]
        if kind == 0:
            models.append(("const", r.svarint()))
        elif kind == 1:
            lo, k = r.svarint(), r.varint()
            models.append(("hist", lo, np.array([r.varint() for _ in range(k)], dtype=np.int64)))
        elif kind == 2:
            lo, hi = r.svarint(), r.svarint()
            mean, scale = np.frombuffer(r.take(8), dtype="<f4").astype(np.float64)
            models.append(("laplace", lo, hi, float(mean), float(scale)))
        else:
            raise ValueError("payload is corrupt (entropy model)")
    return models


# ---------------------------------------------------------------- encode / decode
def _smallest_byte_codec(data: bytes) -> bytes:
    return min((bytes([CODEC_IDS[name]]) + comp(data) for name, (comp, _) in BYTE_CODECS.items()), key=len)


def encode(entries: list[Entry], codec: str) -> bytes:
    """The payload of `entries` under one codec."""
    header = _header(entries)
    arrays = [c for e in entries for c in e.codes]
    if codec == ENTROPY_CODEC:
        models = [choose_model(a) if a.size else ("const", 0) for a in arrays]
        meta = _smallest_byte_codec(header + _models_bytes(models))
        body = varint(len(meta)) + meta + ans_encode(arrays, models)
    else:
        codes = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        body = BYTE_CODECS[codec][0](varint(len(header)) + header + _planes(codes))
    out = bytes([MAGIC, CODEC_IDS[codec]]) + body
    return out + zlib.crc32(out).to_bytes(4, "little")


def encode_all(entries: list[Entry]) -> dict[str, bytes]:
    """The payload under every codec, each in a thread of its own (the compressors release the
    GIL); the description is the shortest."""
    with ThreadPoolExecutor(len(CODEC_IDS)) as pool:
        futures = {name: pool.submit(encode, entries, name) for name in CODEC_IDS}
    out = {}
    for name, future in futures.items():
        try:
            out[name] = future.result()
        except ValueError:  # only the entropy coder refuses input (codes too wide for it)
            if name != ENTROPY_CODEC:
                raise
    return out


def decode_entries(payload: bytes) -> tuple[list[Entry], str]:
    """Entries and codec name from a payload; ValueError on anything malformed."""
    if not isinstance(payload, (bytes, bytearray)) or len(payload) < 6:
        raise ValueError("payload is empty or too short")
    payload = bytes(payload)
    if payload[0] != MAGIC or payload[1] not in CODEC_NAMES:
        raise ValueError("payload is not an mdlgrok description (bad magic or codec byte)")
    if zlib.crc32(payload[:-4]).to_bytes(4, "little") != payload[-4:]:
        raise ValueError("payload is corrupt (checksum mismatch)")
    codec = CODEC_NAMES[payload[1]]
    try:
        return _decode_body(payload[2:-4], codec), codec
    except ValueError as exc:  # ours name the payload; bz2 and others raise bare ValueErrors
        raise exc if str(exc).startswith("payload") else ValueError(f"payload is corrupt ({exc})") from None
    except Exception as exc:  # codec libraries raise their own types on garbage
        raise ValueError(f"payload is corrupt ({type(exc).__name__}: {exc})") from None


def _decode_body(body: bytes, codec: str) -> list[Entry]:
    if codec == ENTROPY_CODEC:
        r = Reader(body)
        meta = r.take(r.varint())
        if not meta or meta[0] not in CODEC_NAMES or CODEC_NAMES[meta[0]] == ENTROPY_CODEC:
            raise ValueError("payload is corrupt (header codec)")
        hr = Reader(BYTE_CODECS[CODEC_NAMES[meta[0]]][1](meta[1:]))
        entries = _read_header(hr)
        sizes = [n for e in entries for n in _code_sizes(e)]
        arrays = ans_decode(r.rest(), sizes, _read_models(hr, len(sizes)))
    else:
        r = Reader(BYTE_CODECS[codec][1](body))
        entries = _read_header(Reader(r.take(r.varint())))
        sizes = [n for e in entries for n in _code_sizes(e)]
        flat = _unplanes(r, sum(sizes))
        arrays = np.split(flat, np.cumsum(sizes)[:-1]) if sizes else []
        if r.pos != len(r.data):
            raise ValueError("payload is corrupt (trailing bytes)")
    it = iter(arrays)
    for e in entries:
        e.codes = tuple(next(it) for _ in _code_sizes(e))
    return entries


def decode(payload: bytes) -> OrderedDict[str, torch.Tensor]:
    """Rebuild the coarse-grained state dict from a payload alone."""
    return state_dict_of(decode_entries(payload)[0])
