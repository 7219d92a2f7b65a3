"""Lossless codecs for the coarse-grained weights.

Byte codecs (zstd, bzip2, lzma) compress a byte string; the entropy coder compresses
integer symbols with an asymmetric numeral system (ANS, Duda 2013) from the `constriction`
library, under a per-array model whose parameters travel in the header. Every codec is
named by one byte in the payload, so the bits that name it are counted.
"""

from __future__ import annotations

import bz2
import lzma
import platform

import constriction
import numpy as np
import zstandard

ZSTD_LEVEL = 22  # zstd's strongest ("ultra") level
BZ2_LEVEL = 9
# Raw LZMA2 stream: no container header; the decoder knows the filter from the codec byte.
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
LZMA_DICT = (4096, 1 << 26)  # LZMA2's smallest dictionary and preset 9's, bytes


def _zstd_compress(data: bytes) -> bytes:
    params = zstandard.ZstdCompressionParameters.from_level(
        ZSTD_LEVEL, source_size=len(data), write_checksum=0, write_content_size=1, write_dict_id=0
    )
    return zstandard.ZstdCompressor(compression_params=params).compress(data)


def _zstd_decompress(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompress(data)


def _lzma_compress(data: bytes) -> bytes:
    """Preset 9e with a dictionary no larger than the input (preset 9's is 64 MiB), without the
    cost of setting up 64 MiB for every payload. No match reaches back past the input's start,
    so the stream is the same in practice (the match finder's smaller hash table could only
    tell at its depth cut). The decoder's 64 MiB dictionary reads it."""
    dict_size = min(max(LZMA_DICT[0], len(data)), LZMA_DICT[1])
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=[{**LZMA_FILTERS[0], "dict_size": dict_size}])


BYTE_CODECS = {
    "zstd": (_zstd_compress, _zstd_decompress),
    "bz2": (lambda d: bz2.compress(d, BZ2_LEVEL), bz2.decompress),
    "lzma": (_lzma_compress, lambda d: lzma.decompress(d, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)),
}
ENTROPY_CODEC = "ans"
CODEC_IDS = {"zstd": 0, "bz2": 1, "lzma": 2, ENTROPY_CODEC: 3}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}


def codec_versions() -> dict[str, str]:
    """Name, library version and level of every codec, recorded beside each size."""
    zv = ".".join(map(str, zstandard.ZSTD_VERSION))
    try:
        from importlib.metadata import version

        cv = version("constriction")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        cv = "unknown"
    return {
        "zstd": f"zstd {zv} (zstandard {zstandard.__version__}) level {ZSTD_LEVEL}",
        "bz2": f"bzip2 (python {platform.python_version()}) level {BZ2_LEVEL}",
        "lzma": f"lzma raw LZMA2 (python {platform.python_version()}) preset 9e",
        ENTROPY_CODEC: f"constriction {cv} ANS, per-array histogram or quantized Laplace model",
    }


# ---------------------------------------------------------------- entropy models
# A model is ("const", value) | ("hist", lo, counts) | ("laplace", lo, hi, mean, scale).
PROB_FLOOR_BITS = 24  # constriction's categorical models quantize probabilities to 24 bits


def empirical_bits(codes: np.ndarray) -> float:
    """n * H(empirical distribution) in bits: what an ideal coder with a known histogram spends."""
    if codes.size == 0:
        return 0.0
    lo, hi = int(codes.min()), int(codes.max())
    counts = np.bincount((codes - lo).ravel()) if hi - lo <= 4 * codes.size else np.unique(codes, return_counts=True)[1]
    return counts_bits(counts)


def counts_bits(counts: np.ndarray) -> float:
    """n * H of a histogram, in bits: n log2 n - sum c log2 c."""
    counts = counts[counts > 0].astype(np.float64)
    n = counts.sum()
    return float(n * np.log2(n) - (counts * np.log2(counts)).sum()) if n else 0.0


def _laplace_fit(codes: np.ndarray) -> tuple[float, float]:
    mean = float(np.median(codes))
    scale = max(float(np.abs(codes - mean).mean()), 0.05)
    return float(np.float32(mean)), float(np.float32(scale))


def _laplace_bits(codes: np.ndarray, mean: float, scale: float, lo: int, hi: int) -> float:
    """-sum log2 p(code) under a Laplace quantized to integers and truncated to [lo, hi] (one
    probability per value in the range, weighted by its count)."""
    values = np.arange(lo, hi + 2, dtype=np.float64) - 0.5  # the edges of the integers' cells
    z = (values - mean) / scale
    cdf = np.where(z < 0, 0.5 * np.exp(np.minimum(z, 0.0)), 1.0 - 0.5 * np.exp(-np.maximum(z, 0.0)))
    p = np.diff(cdf) / (cdf[-1] - cdf[0])
    counts = np.bincount(codes.ravel() - lo, minlength=hi - lo + 1)
    return float(-(counts * np.log2(np.maximum(p, 2.0**-PROB_FLOOR_BITS))).sum())


def choose_model(codes: np.ndarray) -> tuple:
    """The per-array model with the smaller estimated size (data plus parameters)."""
    lo, hi = int(codes.min()), int(codes.max())
    if lo == hi:
        return ("const", lo)
    if hi - lo >= 2**PROB_FLOOR_BITS or lo < -(2**31) or hi >= 2**31:  # constriction: 24-bit probabilities, i32 symbols
        raise ValueError(f"codes in [{lo}, {hi}] are too wide for the entropy coder; use a byte codec")
    counts = np.bincount(codes - lo)
    hist_cost = empirical_bits(codes) + 8 * sum(len(varint(int(c))) for c in counts)
    mean, scale = _laplace_fit(codes)
    lap_cost = _laplace_bits(codes, mean, scale, lo, hi) + 64
    if lap_cost < hist_cost:
        return ("laplace", lo, hi, mean, scale)
    return ("hist", lo, counts)


def _constriction_model(model: tuple):
    m = constriction.stream.model
    if model[0] == "hist":
        counts = np.asarray(model[2], dtype=np.float64)
        return m.Categorical(counts / counts.sum(), perfect=False)
    _, lo, hi, mean, scale = model
    return m.QuantizedLaplace(lo, hi, mean, scale)


def _symbols(codes: np.ndarray, model: tuple) -> np.ndarray:
    return (codes - model[1] if model[0] == "hist" else codes).astype(np.int32)


def ans_encode(arrays: list[np.ndarray], models: list[tuple]) -> bytes:
    """All arrays into one ANS stream (encoded in reverse so they decode in order)."""
    coder = constriction.stream.stack.AnsCoder()
    for codes, model in reversed(list(zip(arrays, models))):
        if model[0] != "const" and codes.size:
            coder.encode_reverse(_symbols(codes, model), _constriction_model(model))
    return coder.get_compressed().astype("<u4").tobytes()


def ans_decode(data: bytes, sizes: list[int], models: list[tuple]) -> list[np.ndarray]:
    if len(data) % 4:
        raise ValueError("ANS stream length is not a whole number of 32-bit words")
    coder = constriction.stream.stack.AnsCoder(np.frombuffer(data, dtype="<u4").astype(np.uint32))
    out = []
    for n, model in zip(sizes, models):
        if model[0] == "const" or n == 0:
            out.append(np.full(n, model[1] if model[0] == "const" else 0, dtype=np.int64))
            continue
        sym = np.asarray(coder.decode(_constriction_model(model), n), dtype=np.int64)
        out.append(sym + model[1] if model[0] == "hist" else sym)
    coded = any(n and model[0] != "const" for n, model in zip(sizes, models))
    if not coder.is_empty() or (coded and not data):  # a valid stream is used up exactly
        raise ValueError("ANS stream is corrupt (missing or left-over words)")
    return out


# ---------------------------------------------------------------- varints
def varint(n: int) -> bytes:
    """Unsigned LEB128."""
    if n < 0:
        raise ValueError("varint of a negative number")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def zigzag(n: int) -> int:
    return 2 * n if n >= 0 else -2 * n - 1


def unzigzag(z: int) -> int:
    return z // 2 if z % 2 == 0 else -(z + 1) // 2


class Reader:
    """Sequential reader of a byte string with clear errors on truncation."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("payload is truncated or corrupt")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def varint(self) -> int:
        shift = result = 0
        while True:
            byte = self.take(1)[0]
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise ValueError("payload is corrupt (varint too long)")

    def svarint(self) -> int:
        return unzigzag(self.varint())

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.pos)
