"""Coarse-graining of a state dict: truncated SVD and quantization to integer codes.

Where the loss applies a matrix as a linear map with inputs of second moment H (see
``moments``), its errors count in the H-norm tr(dW H dW^T): it is truncated by the SVD of
W H^(1/2) (the data-aware SVD) and rounded with error feedback along its input columns (GPTQ,
Frantar et al. 2023), so that rounding errors fall where the inputs barely reach.

Rank convention (mdlgrok): for singular values s_1 >= s_2 >= ..., the rank kept at
fraction tau is the smallest k with s_1 + ... + s_k >= tau * sum(s) (k = 0 at tau = 0).
The paper's code keeps one fewer (``paper_rank``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from mdlgrok.complexity.moments import RowMoments, RowReads
from mdlgrok.complexity.payload import BIN_STEPS, Entry, bin_width, fourier_basis, matrix_shape

FOURIER_MIN_ROWS = 8  # smallest matrix whose rows are tried in the Fourier basis
FOURIER_TRIM = 4  # the basis may leave out up to this many last rows (tokens that are not residues)
FOURIER_GAIN = 0.97  # tried only when it shrinks the l1 norm of the matrix by 3% or more (a random matrix: about 1)
FOURIER_SAMPLE = 1 << 17  # a larger matrix is judged on a seeded sample of columns holding about this many entries


@dataclass
class Target:
    """One state-dict entry as the search sees it."""

    index: int
    name: str
    tensor: torch.Tensor  # the original, on CPU
    alias: int = -1  # index of an earlier entry sharing this storage
    rows: tuple[int, ...] = ()  # the only rows the loss reads (empty: all); the others decode to zero
    transposed: bool = False  # the coded matrix is W^T: a weight read as x @ W (its rows are the inputs)
    h: np.ndarray | None = field(default=None, repr=False)  # input second moment (n x n, mean diagonal 1)
    part: bool = False  # a later block of rows of a tensor that another target also codes (split_rows)
    reads: np.ndarray | None = field(default=None, repr=False)  # lookups of each row (a table: RowReads)
    w: np.ndarray = field(init=False, repr=False)  # float64 flat copy of the coded rows (floating tensors)
    _svd: tuple | None = field(default=None, init=False, repr=False)
    _white: tuple | None = field(default=None, init=False, repr=False)
    _fourier: int | None = field(default=None, init=False, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.w = self.coded().detach().double().numpy().reshape(-1) if self.quantizable else np.zeros(0)

    def coded(self) -> torch.Tensor:
        """The part of the tensor that is coded: its listed rows, or all of it (transposed: W^T)."""
        part = self.tensor[list(self.rows)] if self.rows else self.tensor
        return part.T if self.transposed else part

    def full(self, coded: np.ndarray) -> torch.Tensor:
        """A tensor of the original shape and dtype from values of the coded part (other rows zero)."""
        return self._placed(coded, lambda: torch.zeros(self.shape, dtype=self.tensor.dtype))

    def patched(self, coded: np.ndarray) -> torch.Tensor:
        """The original tensor with values of the coded part in place (its other rows as they are)."""
        return self._placed(coded, self.tensor.clone)

    def _placed(self, coded: np.ndarray, others: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Values of the coded part in the original shape and dtype, the other rows from others()."""
        part = torch.from_numpy(coded.reshape(self.coded_shape)).to(self.tensor.dtype)
        if self.transposed:
            return part.T
        if not self.rows:
            return part
        out = others()
        out[list(self.rows)] = part
        return out

    @property
    def quantizable(self) -> bool:
        return self.alias < 0 and self.tensor.is_floating_point() and self.tensor.numel() > 0

    @property
    def is_matrix(self) -> bool:
        return self.quantizable and self.tensor.ndim >= 2 and min(matrix_shape(self.coded_shape)) >= 2

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def coded_shape(self) -> tuple[int, ...]:
        if self.transposed:
            return self.shape[::-1]
        return (len(self.rows), *self.shape[1:]) if self.rows else self.shape

    def svd(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(U, s, Vt) of the matrix view of the coded part, computed once (float64)."""
        with self._lock:  # the options of one target may be built in two threads
            if self._svd is None:
                self._svd = thin_svd(self.w.reshape(matrix_shape(self.coded_shape)))
        return self._svd

    def whitened(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(U, s, Vt) of W R and R^-1, for the upper triangular R with R R^T = H.

        Any square root of H gives the singular values and U of W H^(1/2), and the same
        truncations W_k = U_k S_k Vt_k R^-1; this one costs one Cholesky factorization, and its
        inverse R^-1 is the upper Cholesky factor of H^-1 = R^-T R^-1 that GPTQ needs."""
        with self._lock:
            if self._white is None:
                flip = np.ascontiguousarray(self.h[::-1, ::-1])  # H = R R^T with R = P chol(P H P) P upper
                root = torch.linalg.cholesky(torch.from_numpy(flip)).flip(0, 1)
                inv_root = torch.linalg.solve_triangular(root, torch.eye(len(root), dtype=root.dtype), upper=True)
                w = self.w.reshape(matrix_shape(self.coded_shape))
                self._white = (*thin_svd(w @ root.numpy()), inv_root.numpy())
        return self._white

    def fourier(self) -> int:
        """How many leading rows to code as Fourier coefficients (0: none): the length, among
        the last FOURIER_TRIM + 1, whose coefficients have the smallest l1 norm, where that
        norm (a proxy for the bits of their codes) is at most FOURIER_GAIN of the rows' own.
        Computed once."""
        with self._lock:
            if self._fourier is None:
                self._fourier = self._best_fourier()
        return self._fourier

    def _best_fourier(self) -> int:
        m, n = matrix_shape(self.coded_shape)
        if not self.is_matrix or m < FOURIER_MIN_ROWS:
            return 0
        w = self.w.reshape(m, n)
        if m * n > FOURIER_SAMPLE:  # a large table: the l1 norms of a seeded sample of its columns
            keep = max(-(-FOURIER_SAMPLE // m), 1)
            w = w[:, seeded_sample(n, keep)]
        plain = np.abs(w).sum()
        l1 = {f: _fourier_l1(w[:f]) + np.abs(w[f:]).sum() for f in range(m, max(m - FOURIER_TRIM, 2) - 1, -1)}
        best = min(l1, key=l1.get)
        return best if l1[best] <= FOURIER_GAIN * plain else 0

    def max_lowrank(self) -> int:
        """Largest rank whose factors are cheaper than the matrix: k (m + n) < m n."""
        m, n = matrix_shape(self.coded_shape)
        return (m * n - 1) // (m + n)


def seeded_sample(n: int, k: int) -> np.ndarray:
    """min(k, n) of the indices 0..n-1, drawn with seed 0 (the same every call), in order."""
    return np.sort(np.random.default_rng(0).choice(n, min(k, n), replace=False))


def _fourier_l1(x: np.ndarray) -> float:
    """l1 norm of fourier_basis(len(x)) @ x, by one real FFT (O(n log n) a column, not O(n^2)):
    the basis rows are the real and imaginary parts of the DFT, scaled by sqrt(2/n), those of
    frequency 0 (and n/2 for even n) by sqrt(1/n)."""
    n = len(x)
    spec = np.fft.rfft(x, axis=0)
    ends = [0, n // 2] if n % 2 == 0 else [0]
    middle = spec[1 : (n - 1) // 2 + 1]
    edge = sum(np.abs(spec[i].real).sum() for i in ends)
    return float(edge / np.sqrt(n) + np.sqrt(2 / n) * (np.abs(middle.real).sum() + np.abs(middle.imag).sum()))


GPTQ_FLOAT32_FROM = 1 << 20  # matrices of this many entries are rounded with GPTQ in float32 (3x faster)
GRAM_FROM = 384  # matrices whose both sides are at least this long, or that hold
GRAM_ENTRIES = 1 << 17  # this many entries (a tall table): SVD from the Gram matrix


def thin_svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U, s, Vt) of x, float64, s descending. A large matrix's comes from the eigenvectors of its
    smaller Gram matrix (about 3x faster than LAPACK's SVD there): s_i is the length of x times
    the i-th eigenvector, exact to about 1e-16 of the largest, and the other side's vectors are
    those products scaled to unit length (zero where s_i is 0). Vectors of components below about
    1e-8 of the largest are not orthogonal: far below what a truncation or a bin resolves."""
    m, n = x.shape
    if min(m, n) < GRAM_FROM and m * n < GRAM_ENTRIES:
        return np.linalg.svd(x, full_matrices=False)
    wide = m < n
    vec = np.linalg.eigh(x @ x.T if wide else x.T @ x)[1]
    other = (vec.T @ x) if wide else (x @ vec).T  # rows: s_i times the other side's singular vectors
    s = np.linalg.norm(other, axis=1)
    order = np.argsort(-s, kind="stable")
    s, vec, other = s[order], vec[:, order], other[order] / np.where(s[order] > 0, s[order], 1.0)[:, None]
    return (vec, s, other) if wide else (other.T, s, vec.T)


def targets_of(
    state: dict[str, torch.Tensor],
    rows: dict[str, tuple[int, ...]] | None = None,
    moments: dict[str, np.ndarray] | None = None,
) -> list[Target]:
    """Targets of a state dict; entries sharing storage (tied weights) become aliases. rows[name]:
    the only rows of that tensor the loss reads (see estimate.read_rows); moments[name]: the
    second moment of its inputs (see moments.input_moments; a weight read as x @ W is coded as
    W^T, a transposed target, unless only some of its rows are read)."""
    seen: dict[tuple, int] = {}
    out = []
    for i, (name, t) in enumerate(state.items()):
        t = t.detach()
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) if t.numel() else None
        alias = seen.get(key, -1) if key else -1
        if key and alias < 0:
            seen[key] = i
        read = (rows or {}).get(name, ()) if alias < 0 else ()
        h = (moments or {}).get(name)
        transposed = isinstance(h, RowMoments) and not read and t.ndim == 2
        target = Target(i, name, t.cpu(), alias, rows=read, transposed=transposed)
        if isinstance(h, RowMoments):  # over W's rows: the inputs of a transposed target only
            h = h.h if transposed else None
        if isinstance(h, RowReads):
            target.reads, h = h.counts, None
        if h is not None and target.is_matrix and t.ndim == 2 and h.shape == (target.coded_shape[1],) * 2:
            target.h = h
        out.append(target)
    return out


def split_rows(targets: list[Target]) -> list[Target]:
    """The targets with the rows of a table that are read differently from the rest as a target
    of their own, placed after all the others: each block has its own options, sensitivity and
    bin (the loss can depend on such rows far more), and entries of the two add up on decoding.
    A table is a matrix that the loss reads only by lookups (its RowReads were counted). Its rows
    apart are those read HEAVY_READS times as often as its median row or more (and in at least
    HEAVY_SHARE of its lookups: not a chance excess of a sparsely read table), or, where none
    are, the rows its Fourier block leaves out (Target.fourier). In either case these are the '='
    and operator tokens of a modular-arithmetic embedding, read in every example, where a
    residue's row is read in about 2 of p."""
    out, parts = [], []
    for t in targets:
        block, apart = _row_blocks(t)
        if not apart:
            out.append(t)
            continue
        out.append(Target(t.index, t.name, t.tensor, rows=block, reads=t.reads))
        parts.append(Target(t.index, t.name, t.tensor, rows=apart, reads=t.reads, part=True))
    return out + parts


HEAVY_READS = 8  # rows of a table read this many times as often as its median row,
HEAVY_SHARE = 0.01  # and in at least this share of its lookups, form a block of their own


def _row_blocks(t: Target) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(the rows of t coded as one block, the rows coded apart); none apart: ((), ())."""
    if t.reads is None or not t.is_matrix or t.h is not None or t.transposed:
        return (), ()
    rows = t.rows or tuple(range(matrix_shape(t.coded_shape)[0]))
    reads = t.reads[list(rows)]
    heavy = (reads >= HEAVY_READS * max(float(np.median(reads)), 1.0)) & (reads >= HEAVY_SHARE * t.reads.sum())
    if 0 < heavy.sum() <= len(rows) // 4:
        return tuple(r for r, h in zip(rows, heavy) if not h), tuple(r for r, h in zip(rows, heavy) if h)
    f = t.fourier()
    return (rows[:f], rows[f:]) if 0 < f < len(rows) else ((), ())


def rank_for_tau(s: np.ndarray, tau: float) -> int:
    """Smallest k with sum(s[:k]) >= tau * sum(s)."""
    if tau <= 0 or s.sum() <= 0:
        return 0
    return int(min(np.searchsorted(np.cumsum(s), tau * s.sum() * (1 - 1e-12)) + 1, len(s)))


def paper_rank(s: np.ndarray, tau: float) -> int:
    """The paper code's rank: one fewer than rank_for_tau (its off-by-one)."""
    return max(rank_for_tau(s, tau) - 1, 0)


def quantize(x: np.ndarray, j: int) -> np.ndarray:
    """Integer codes of x on the grid of bin 2^(j/BIN_STEPS) (round half to even)."""
    scaled = np.divide(x, bin_width(j))
    return np.rint(scaled, out=scaled).astype(np.int64)  # rounded in place: one array less to allocate


def bin_index(delta: float) -> int:
    """The grid exponent j whose bin is nearest to delta (in log scale)."""
    return int(round(BIN_STEPS * np.log2(delta)))


def gptq_codes(x: np.ndarray, js, u: np.ndarray, block: int = 64, errors: bool = False, dtype=np.float64):
    """Integer codes of matrix x (m x n) on the grid of every bin in js: (len(js), m, n).

    Columns are rounded in order and each rounding error is spread over the later columns
    (GPTQ): the rows' error in the H-norm is what is kept small. u: upper Cholesky factor of
    H^-1. Rows are independent, so the first k rows' codes are those of x[:k] alone.
    With `errors`, also each row's squared error in the H-norm, (len(js), m): with E the scaled
    rounding errors below, Q - X = -E U, and U H U^T = I, so (Q - X) H (Q - X)^T = E E^T.

    Within a block of columns, column i takes the feedback of the block's earlier errors when
    it is rounded (one product); the later columns take the whole block's at once. dtype: of the
    arithmetic. float32 is about 3x faster; its codes part from float64's where a rounding falls
    within float32's precision of a tie (and the rest of that row may follow), its bits and
    errors agree to about 1e-3."""
    widths = np.array([bin_width(j) for j in js], dtype)
    u = u.astype(dtype, copy=False)
    n, nb, m = x.shape[1], len(widths), x.shape[0]
    xt = np.empty((n, nb * m), dtype)  # column i of every bin is row xt[i]; written once (no transposed copy)
    np.divide(x.T[:, None, :], widths[None, :, None], out=xt.reshape(n, nb, m), casting="same_kind")
    rounded = np.empty_like(xt)  # the codes, as floats until the end
    ut, diag = np.ascontiguousarray(u.T), np.diagonal(u).tolist()  # u's columns as rows: contiguous slices
    sq = np.zeros(nb * m, dtype)
    errs = np.empty((min(block, n), nb * m), dtype)
    for lo in range(0, n, block):  # in place, one array operation at a time: small matrices pay per call
        hi = min(lo + block, n)
        e = errs[: hi - lo]
        for i in range(lo, hi):
            col, ek = xt[i], e[i - lo]
            if i > lo:
                col -= ut[i, lo:i] @ e[: i - lo]
            np.subtract(col, np.rint(col, out=rounded[i]), out=ek)
            ek /= diag[i]
        if hi < n:
            xt[hi:] -= u[lo:hi, hi:].T @ e
        sq += (e**2).sum(0)
    codes = rounded.astype(np.int64).reshape(n, nb, m).transpose(1, 2, 0)
    return (codes, sq.reshape(nb, m) * widths[:, None] ** 2) if errors else codes


def to_fourier(x: np.ndarray, f: int) -> np.ndarray:
    """x with its first f rows replaced by their Fourier coefficients (payload.from_fourier inverts it)."""
    if not f:
        return x
    return np.concatenate([fourier_basis(f) @ x[:f], x[f:]])


def round_rows(t: Target, x: np.ndarray, js) -> np.ndarray:
    """Integer codes of matrix x (t's matrix or its factor B) on every bin in js: (len(js), m, n);
    rounded to nearest, or with error feedback in the H-norm where t.h is known (in float32
    arithmetic on a matrix of GPTQ_FLOAT32_FROM entries or more: see gptq_codes)."""
    if t.h is None:
        return np.stack([quantize(x, j) for j in js])
    return gptq_codes(x, js, t.whitened()[3], dtype=np.float32 if x.size >= GPTQ_FLOAT32_FROM else np.float64)


def dense_codes(t: Target, j: int, fourier: int = 0) -> np.ndarray:
    """Flat integer codes of the coded part of t on bin j, its first `fourier` rows as Fourier
    coefficients (with error feedback where t.h is known: an orthonormal map of the rows keeps
    the H-norm, so the rows are rounded after it)."""
    return round_rows(t, to_fourier(t.w.reshape(matrix_shape(t.coded_shape)), fourier), [j])[0].reshape(-1)


def zero_entry(t: Target) -> Entry:
    return Entry(t.name, t.shape, t.tensor.dtype, "zero")


def dense_entry(t: Target, j: int, fourier: int = 0) -> Entry:
    codes = dense_codes(t, j, fourier)
    if not codes.any():
        return zero_entry(t)
    return Entry(
        t.name,
        t.shape,
        t.tensor.dtype,
        "dense",
        codes=(codes,),
        bins=(j,),
        rows=t.rows,
        fourier=fourier,
        transposed=t.transposed,
    )


def factors(t: Target, k: int, comps: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Balanced rank-k factors A = U_k S_k^1/2 (m x k), B = S_k^1/2 V_k^T (k x n) of W, or of
    W R where t.h is known (then B = S_k^1/2 V_k^T R^-1, with R R^T = H: see Target.whitened).
    comps: only these components' columns of A and rows of B (default: the first k)."""
    comps = slice(k) if comps is None else comps
    u, s, vt, *inv_root = t.svd() if t.h is None else t.whitened()
    a, b = u[:, comps] * np.sqrt(s[comps]), np.sqrt(s[comps])[:, None] * vt[comps]
    return (a, b @ inv_root[0]) if inv_root else (a, b)


def factor_codes(t: Target, a: np.ndarray, b: np.ndarray, ja: int, jb: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of the factors: A rounded, B with error feedback where t.h is known."""
    return quantize(a, ja), round_rows(t, b, [jb])[0]


def lowrank_entry(t: Target, k: int, ja: int, jb: int | None = None, fourier: int = 0) -> Entry:
    """Rank-k factors on bins ja, jb; the first `fourier` rows of A as Fourier coefficients."""
    if k == 0:
        return zero_entry(t)
    a, b = factors(t, k)
    a = to_fourier(a, fourier)
    jb = ja if jb is None else jb
    codes = tuple(c.ravel() for c in factor_codes(t, a, b, ja, jb))
    return Entry(
        t.name,
        t.shape,
        t.tensor.dtype,
        "lowrank",
        codes=codes,
        bins=(ja, jb),
        rank=k,
        rows=t.rows,
        fourier=fourier,
        transposed=t.transposed,
    )


def raw_entry(t: Target) -> Entry:
    """The tensor's own bytes, losslessly (non-float tensors, or as a fallback)."""
    if t.alias >= 0:
        return Entry(t.name, t.shape, t.tensor.dtype, "alias", alias=t.alias)
    data = t.tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.tensor.numel() else b""
    return Entry(t.name, t.shape, t.tensor.dtype, "raw", raw=data)
