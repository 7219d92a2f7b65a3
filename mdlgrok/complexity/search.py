"""mdlgrok's search: per-tensor ranks and bins for every eps from one shared set of loss calls.

1. Options. For every tensor, candidate coarse-grainings (zero, dense codes at every bin of
   a 2^(1/4) grid, and for matrices rank-k factors at every bin, each also with Fourier rows
   where coarse.Target.fourier finds them) with their estimated bits (empirical entropy of
   the codes) and squared error (in the H-norm of the inputs where moments are known: see
   coarse); only the lower convex hull of (error, bits) is kept.
2. Sensitivity. The loss increase per unit of squared error of each tensor, s_t, from an
   antithetic noise probe: (L(w+z) + L(w-z) - 2 L(w)) / (2 |z|^2) cancels the gradient term.
3. Path. With predicted loss increase sum_t s_t err_t, the optimal allocation for a
   multiplier lambda picks on each hull the point minimizing bits + lambda s_t err_t
   (Shoham & Gersho 1988). Sweeping lambda is a greedy walk: always take the hull step
   that saves the most bits per unit of predicted loss. One path is walked for each
   shrinkage of the sensitivities toward their geometric mean (`shrink`), since the
   probe's spread between tensors is only roughly right where the constraint binds.
4. Search. For each eps, a binary search along every path with the real loss on the full
   training set; from the cheapest feasible point that this eps' searches evaluated (from
   MULTI_START_EPS up, from each of the cheapest of MULTI_STARTS paths), a calibration of the
   decoded bins (the same codes scaled by grid steps), then a greedy pass that coarsens single
   tensors further while the constraint holds (both once more where that pass changed the
   configuration). Losses are cached and shared by all eps and paths, but
   each eps chooses only among the points its own steps visited: the answer for an eps does
   not depend on which other eps were asked.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from mdlgrok.complexity.coarse import (
    Target,
    bin_index,
    dense_entry,
    factors,
    gptq_codes,
    lowrank_entry,
    quantize,
    raw_entry,
    seeded_sample,
    to_fourier,
    zero_entry,
)
from mdlgrok.complexity.codecs import counts_bits, empirical_bits
from mdlgrok.complexity.payload import BIN_STEPS, Entry, add_block, bin_width, entry_tensor, matrix_shape

MODEL_BITS = 48  # rough cost of one array's entropy model, for ranking options only
BIN_STRIDE = 2  # options on every 2nd grid point, bins 2^(1/4) apart (calibration moves by 2^(1/8))
EXACT_STRIDE = 8  # GPTQ's bits and errors computed every 8 grid steps (a factor 2 apart), estimated between,
LOW_RATE_BITS = 2.0  # but on every bin where rounding to nearest spends under 2 bits a weight,
ESTIMATE_FROM = 1 << 17  # and on all bins of a matrix of fewer entries (the paper model's are 65,536 at most)
PARALLEL_FROM = 1 << 17  # options built in threads where a tensor holds this many entries
FACTOR_ROWS = 64  # factor statistics from the first 64 components, then from about 64 more, evenly spaced
SAMPLE_ROWS = 256  # dense options of a larger matrix: statistics from this many of its rows (or more)
GPTQ_RATIO_ENTRIES = 1 << 15  # GPTQ rounds an even subset of those rows holding this many entries or more,
GPTQ_RATIO_ROWS = 16  # and this many rows at least
FINEST_BITS = 12  # finest bin: max|w| / 2^12
HIGH_RATE_BITS = 5.0  # bins finer than where rounding to nearest spends 5 bits a weight follow the high-rate law
PROBE_TARGET = 0.02  # aim of the sensitivity probe's loss increase, nats
SHRINKAGE = (0.0, 0.5, 1.0)  # exponents beta tried for the sensitivities (1: as the probe measured them)
MAX_SHIFT = 8  # calibration: decoded bins at most 2^(8/8) from the coding bin
POLISH_PASSES = 1
ROUNDS = 2  # rounds of calibration and polish
MULTI_START_EPS = 2.0  # nats: from here up, the cheapest starts of several paths are refined
MULTI_STARTS = 2
CALIB_MIN_SHARE = 0.01  # the second round calibrates only tensors holding at least 1% of the bits
POLISH_MIN_SHARE = 0.01  # polish tensors holding at least 1% of the bits
ENTRY_CODES = 1 << 22  # rounded entries kept per tensor (the last used): about this many codes, two at least
RANKS = (
    1,
    2,
    3,
    4,
    5,
    6,
    8,
    10,
    12,
    14,
    16,
    20,
    24,
    28,
    32,
    40,
    48,
    56,
    64,
    80,
    96,
    112,
    128,
    160,
    192,
    224,
    256,
    320,
    384,
    448,
    512,
)


class LossError(ValueError):
    """The loss closure raised or returned a non-finite value for the original model."""


class LossOracle:
    """Evaluates loss_fn on a private copy of the model with given tensors swapped in; where
    `accept` (a second constraint, e.g. on accuracy) rejects the module, the loss is inf."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module], float], accept=None):
        self.accept = accept
        self.probe = copy.deepcopy(model)
        # tensors only: a module's extra state (get_extra_state) is not a weight
        self.slots = {k: v for k, v in self.probe.state_dict(keep_vars=False).items() if isinstance(v, torch.Tensor)}
        self.original = copy.deepcopy(self.slots)  # a deep copy keeps tied weights tied (targets_of aliases them)
        self.loss_fn, self.calls, self.seconds = loss_fn, 0, 0.0  # calls, and the time inside them
        self._held: dict[int, torch.Tensor] = {}  # a slot's storage -> the tensor last copied into it
        self._params = {p.data_ptr() for p in self.probe.parameters()}  # the slots that a forward pass leaves alone

    def restore(self) -> None:
        """Put the original weights back in the probe (no loss call), every slot copied anew."""
        self._held.clear()
        self.place({})

    def _put(self, name: str, value: torch.Tensor) -> None:
        """Copy value into the slot, unless the slot is a parameter's and that very tensor is the
        last one copied there (the search hands the same decoded tensors over and over, and no
        one writes into them; a buffer, such as a batch norm's running mean, is copied anew)."""
        slot, key = self.slots[name], self.slots[name].data_ptr()
        if key not in self._params or self._held.get(key) is not value:
            slot.copy_(value)
            self._held[key] = value

    def place(self, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
        """The probe with `tensors` in place of the originals (the others are the originals)."""
        with torch.no_grad():  # originals first, then the given ones (tied weights share a slot)
            for name in self.slots:
                if name not in tensors:
                    self._put(name, self.original[name])
            for name, value in tensors.items():
                self._put(name, value)
        return self.probe

    def __call__(self, tensors: dict[str, torch.Tensor], constrained: bool = True) -> float:
        """Loss with `tensors` in place of the originals (the others are the originals); inf where
        `accept` rejects it, unless constrained=False (the loss alone)."""
        self.place(tensors)
        self.calls += 1
        start = time.perf_counter()
        try:
            value = float(self.loss_fn(self.probe))
            if constrained and self.accept is not None and math.isfinite(value) and not self.accept(self.probe):
                value = math.inf
        except Exception as exc:
            raise LossError(f"the loss closure raised {type(exc).__name__}: {exc}") from exc
        finally:
            self.seconds += time.perf_counter() - start
        return value if math.isfinite(value) else math.inf


def within(loss: float, base: float, eps: float) -> bool:
    """The constraint: a finite loss at most eps above the original's (eps may be inf)."""
    return loss < math.inf and loss <= base + eps


@dataclass
class Option:
    kind: str  # zero | dense | lowrank
    bits: float  # estimated
    err: float  # squared error |W - W_hat|^2 (Frobenius, or the H-norm where the target's moments are known)
    j: int = 0
    k: int = 0
    fourier: int = 0  # leading rows (of the matrix, or of A) coded as Fourier coefficients

    def entry(self, t: Target) -> Entry:
        if self.kind == "zero":
            return zero_entry(t)
        if self.kind == "dense":
            return dense_entry(t, self.j, self.fourier)
        return lowrank_entry(t, self.k, self.j, fourier=self.fourier)


def _bin_range(amax: float) -> range:
    if not amax > 0:
        return range(0)
    hi = bin_index(2 * amax)
    return range(bin_index(amax / 2**FINEST_BITS), hi + 1, BIN_STRIDE)


def _fouriers(t: Target) -> list[int]:
    """The row bases tried for t: its own rows, and the Fourier basis where it pays (coarse.Target.fourier)."""
    return sorted({0, t.fourier()})


def _dense_options(t: Target) -> list[Option]:
    out = []
    for f in _fouriers(t):
        w = to_fourier(t.w.reshape(matrix_shape(t.coded_shape)), f)
        js = list(_bin_range(float(np.abs(w).max())))
        for j, (bits, err, nonzero) in zip(js, _bin_stats(t, w, js, empirical_bits, sample=True)):
            if nonzero:  # an orthonormal map of the rows: the error is the same in either basis
                out.append(Option("dense", bits + MODEL_BITS, float(err.sum()), j=j, fourier=f))
    return out


def _bin_stats(
    t: Target, x: np.ndarray, js: list[int], bits_of, sample: bool = False, entries=None, ratio_rows=None
) -> list[tuple]:
    """For every bin in js: (bits_of(codes), each row's squared error, whether any code is non-zero),
    for the codes of matrix x that coarse.round_rows gives.

    Rounding to nearest costs O(mn) a bin, GPTQ (where t.h is known) O(mn^2). So on a matrix of
    ESTIMATE_FROM entries or more GPTQ runs every EXACT_STRIDE grid steps and on every bin of low
    rate (where GPTQ's codes and those of rounding to nearest part: most codes zero); between them
    its bits and errors are estimated: those of rounding to nearest (the error in the diagonal of
    H, as for independent errors), times the ratios GPTQ / nearest at the two exact bins around,
    interpolated in log. With `sample` (bits that add over rows), a large matrix's statistics are
    those of a seeded sample of its rows, scaled up (_sampled_stats), GPTQ rounding an even subset
    of the sample alone (`ratio_rows`, GPTQ_RATIO_ENTRIES entries: _subset_stats). Bins finer
    than the high-rate cut (_high_rate_cut) follow from the finest bin computed: each grid step
    finer adds 1/BIN_STEPS bit to each of the `entries` (default x.size) that a bits_of count
    covers and scales the error by 2^(-2/BIN_STEPS). Only the options' ranking uses the
    estimates: an option's entry is always rounded exactly (coarse.round_rows)."""
    if sample and _sampled(x):
        return _sampled_stats(t, x, js, bits_of)
    entries = x.size if entries is None else entries
    return _beyond_high_rate(x, js, entries, lambda part: _computed_stats(t, x, part, bits_of, entries, ratio_rows))


def _beyond_high_rate(x: np.ndarray, js: list[int], entries, compute) -> list[tuple]:
    """compute(bins) -> (bits, err, nonzero) per bin, called on the bins from the high-rate cut
    up; the finer bins follow from the finest computed one by the high-rate law."""
    cut = _high_rate_cut(x, js)
    computed = compute(js[cut:])
    return [_finer(computed[0], js[cut] - js[i], entries) for i in range(cut)] + computed


def _high_rate_cut(x: np.ndarray, js: list[int]) -> int:
    """Index in js (fine to coarse) of the coarsest bin on which rounding x to nearest spends at
    least HIGH_RATE_BITS a weight (0 where none does); finer bins are in the high-rate regime,
    where bits ~ h(w) - log2(bin) and the error ~ bin^2 / 12 (Gersho & Gray 1992, ch. 5)."""
    lo, hi = 0, len(js)  # predicate true at lo (or lo = 0), false from hi on
    if not js or empirical_bits(quantize(x, js[0])) < HIGH_RATE_BITS * x.size:
        return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if empirical_bits(quantize(x, js[mid])) >= HIGH_RATE_BITS * x.size else (lo, mid)
    return lo


def _finer(stat: tuple, steps: int, entries) -> tuple:
    """The statistics `steps` grid steps (of 2^(1/BIN_STEPS)) finer than `stat`'s, by the high-rate law."""
    bits, err, nonzero = stat
    return bits + np.multiply(entries, steps / BIN_STEPS), err * 2.0 ** (-2 * steps / BIN_STEPS), nonzero


def _computed_stats(t: Target, x: np.ndarray, js: list[int], bits_of, entries, ratio_rows=None) -> list[tuple]:
    if t.h is not None and x.size < ESTIMATE_FROM:
        return _gptq_stats(t, x, js, bits_of)
    near = [_nearest_stats(t, x, j, bits_of) for j in js]
    if t.h is None or not js:
        return near
    low_rate = [i for i, (bits, _, _) in enumerate(near) if np.max(bits) < LOW_RATE_BITS * np.max(entries)]
    exact_at = sorted({*range(0, len(js), max(EXACT_STRIDE // BIN_STRIDE, 1)), len(js) - 1, *low_rate})
    exact, ratios = _exact_ratios(t, x, js, exact_at, near, bits_of, ratio_rows)
    out = []
    for i, (bits, err, nonzero) in enumerate(near):
        if i in exact:
            out.append(exact[i])
            continue
        lo, hi = max(e for e in exact_at if e < i), min(e for e in exact_at if e > i)  # bins 0 and last are exact
        w = (i - lo) / (hi - lo)
        scale = [np.exp((1 - w) * np.log(a) + w * np.log(b)) for a, b in zip(ratios[lo], ratios[hi])]
        out.append((bits * scale[0], err * scale[1], nonzero))
    return out


def _exact_ratios(t: Target, x: np.ndarray, js, exact_at, near, bits_of, ratio_rows) -> tuple[dict, dict]:
    """(GPTQ's statistics at the bins exact_at, the ratios GPTQ / nearest there). With ratio_rows,
    GPTQ rounds those rows alone (_subset_stats)."""
    bins = [js[i] for i in exact_at]
    if ratio_rows is None:
        exact = dict(zip(exact_at, _gptq_stats(t, x, bins, bits_of)))
    else:
        exact = dict(zip(exact_at, _subset_stats(t, x, bins, [near[i] for i in exact_at], bits_of, ratio_rows)))
    return exact, {i: (_ratio(exact[i][0], near[i][0]), _ratio(exact[i][1], near[i][1])) for i in exact_at}


def _subset_stats(t: Target, x: np.ndarray, bins, near, bits_of, rows) -> list[tuple]:
    """GPTQ's statistics of all x's rows from those of some of them: each row's error that of
    rounding to nearest times the subset's ratio GPTQ / nearest; the bits, where the subset's
    nearest codes spend LOW_RATE_BITS a weight or more, those of x's nearest codes times the
    subset's ratio (a small histogram undercounts the entropy of fine bins, in both alike),
    below it the subset's own, scaled up to all rows (few codes are not zero)."""
    sub, factor = x[rows], len(x) / len(rows)
    out = []
    for j, whole, g in zip(bins, near, _gptq_stats(t, sub, bins, bits_of)):
        n_bits, n_err, _ = _nearest_stats(t, sub, j, bits_of)
        fine = np.max(n_bits) >= LOW_RATE_BITS * sub.size
        bits = whole[0] * _ratio(g[0], n_bits) if fine else g[0] * factor
        out.append((bits, whole[1] * _ratio(g[1].sum(), n_err.sum()), g[2] or whole[2]))
    return out


def _sample_size(x: np.ndarray) -> int:
    """Rows in the sample of a large matrix: SAMPLE_ROWS, and at least ESTIMATE_FROM entries (the
    histogram of a small sample would underestimate the entropy of finely binned codes)."""
    return max(SAMPLE_ROWS, -(-ESTIMATE_FROM // x.shape[1]))


def _sampled(x: np.ndarray) -> bool:
    """Whether x is large enough that its statistics come from a sample of its rows."""
    return x.size >= ESTIMATE_FROM and len(x) > _sample_size(x)


def _sample_rows(x: np.ndarray) -> np.ndarray:
    """A seeded sample of x's row indices (_sample_size of them), in order."""
    return seeded_sample(len(x), _sample_size(x))


def _sampled_stats(t: Target, x: np.ndarray, js: list[int], bits_of) -> list[tuple]:
    """_bin_stats of a large matrix from a seeded sample of its rows (both roundings round rows
    independently): the sample's bits and errors times rows / sampled rows, the errors as one
    total per sampled row; whether any code is non-zero is read off the whole matrix."""
    sample = x[_sample_rows(x)]
    factor = len(x) / len(sample)
    amax = float(np.abs(x).max())
    return [
        (bits * factor, err * factor, nonzero or amax > bin_width(j) / 2)
        for j, (bits, err, nonzero) in zip(js, _bin_stats(t, sample, js, bits_of, ratio_rows=_ratio_rows(sample)))
    ]


def _ratio_rows(x: np.ndarray) -> np.ndarray | None:
    """Evenly spaced rows of a sample holding GPTQ_RATIO_ENTRIES entries or more, GPTQ_RATIO_ROWS
    rows at least (None: all of them)."""
    k = max(-(-GPTQ_RATIO_ENTRIES // x.shape[1]), GPTQ_RATIO_ROWS)
    return np.linspace(0, len(x) - 1, k).round().astype(np.int64) if k < len(x) else None


def _nearest_stats(t: Target, x: np.ndarray, j: int, bits_of) -> tuple:
    codes = quantize(x, j)
    d2 = (codes * bin_width(j) - x) ** 2
    return bits_of(codes), (d2 if t.h is None else d2 * np.diag(t.h)).sum(1), bool(codes.any())


def _gptq_stats(t: Target, x: np.ndarray, js: list[int], bits_of, chunk: int = 16) -> list[tuple]:
    """(bits, row errors in the H-norm, any non-zero) of GPTQ's codes on every bin in js, a chunk
    of bins at a time (one GPTQ pass rounds a chunk; the chunk bounds its memory). The statistics
    only rank the options, so the arithmetic is float32 (about 3x faster than float64, the same to
    about 1e-3); the entry of a chosen option is rounded in float64."""
    out = []
    for lo in range(0, len(js), chunk):
        part = js[lo : lo + chunk]
        codes, errors = gptq_codes(x, part, t.whitened()[3], errors=True, dtype=np.float32)
        out += [(bits_of(c), e, bool(c.any())) for c, e in zip(codes, errors)]
    return out


def _ratio(exact, near):
    """exact / near, elementwise, 1 where either is 0 (nothing to scale)."""
    exact, near = np.asarray(exact, np.float64), np.asarray(near, np.float64)
    ok = (exact > 0) & (near > 0)
    return np.where(ok, exact / np.where(ok, near, 1.0), 1.0)


def _lowrank_options(t: Target) -> list[Option]:
    """Rank-k factor options for every rank and bin.

    The rank-k factors are the first k columns of A and rows of B, so each bin is quantized
    once at the largest rank and every smaller rank reads its error and code histogram off
    sums over components. Beyond the first FACTOR_ROWS components, those of a regular sample
    stand for the rest (_components)."""
    ranks = [r for r in RANKS if r <= t.max_lowrank()]
    if not ranks:
        return []
    s = t.svd()[1] if t.h is None else t.whitened()[1]
    big = ranks[-1]
    tail = np.concatenate([np.cumsum((s**2)[::-1])[::-1], [0.0]])  # tail[k] = sum_{i>=k} s_i^2
    idx = np.array(ranks) - 1
    comps, cover = _components(big)
    a, b = factors(t, big, comps)
    weight = np.clip(idx[:, None] + 1 - comps[None, :], 0, cover[None, :]).astype(np.float64)
    fa = {f: to_fourier(a, f) for f in _fouriers(t)}  # A's rows in either basis (orthonormal: same error)
    js = list(_bin_range(max(*(float(np.abs(x).max()) for x in fa.values()), float(np.abs(b).max()))))
    # B's rows are rounded independently (also by GPTQ), so the sampled ones' codes are their own
    b_stats = _bin_stats(t, b, js, lambda q: _prefix_bits(q, weight), entries=(idx + 1) * b.shape[1])
    a_stats = {f: _factor_stats(af, js, weight) for f, af in fa.items()}
    out = []
    for i, (j, (b_bits, db2, _)) in enumerate(zip(js, b_stats)):
        for f in fa:
            a_bits, da2, _ = a_stats[f][i]
            # |W - A'B'|^2 ~ truncation + sum_i s_i (|dA_i|^2 + |dB_i|^2): the parts are orthogonal
            # (in the H-norm, |dB_i|^2_H, where t.h is known: W H^(1/2) is what was factored)
            err = tail[idx + 1] + np.cumsum(s[:big] * np.repeat(da2 + db2, cover))[idx]
            bits = a_bits + b_bits + 2 * MODEL_BITS
            out += [Option("lowrank", float(bi), float(e), j=j, k=k, fourier=f) for k, bi, e in zip(ranks, bits, err)]
    return out


def _components(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(the components whose factor statistics are computed, how many components each stands
    for) of factors of n components: all of them up to 2 FACTOR_ROWS; else the first
    FACTOR_ROWS, then every stride-th (about FACTOR_ROWS more), each standing for itself and
    those up to the next. The first are the strongest, and alone in the lowest ranks."""
    if n <= 2 * FACTOR_ROWS:
        return np.arange(n), np.ones(n, np.int64)
    stride = -(-(n - FACTOR_ROWS) // FACTOR_ROWS)
    comps = np.concatenate([np.arange(FACTOR_ROWS), np.arange(FACTOR_ROWS, n, stride)])
    return comps, np.diff(np.append(comps, n))


def _factor_stats(a: np.ndarray, js: list[int], weight: np.ndarray) -> list[tuple]:
    """For every bin in js: the bits of A's columns taken weight[r, i] times each (column i),
    for every r (_prefix_bits), each column's squared error and True, rounded to nearest (finer
    than the high-rate cut: by its law). A large A's are those of a seeded sample of its rows
    (rounded independently), times rows / sampled."""
    if _sampled(a):
        rows = _sample_rows(a)
        factor = len(a) / len(rows)
        return [(bits * factor, err * factor, True) for bits, err, _ in _factor_stats(a[rows], js, weight)]

    def stats(j: int) -> tuple:
        q = quantize(a, j)
        return _prefix_bits(q.T, weight), ((q * bin_width(j) - a) ** 2).sum(0), True

    return _beyond_high_rate(a, js, weight.sum(1) * a.shape[0], lambda part: [stats(j) for j in part])


def _prefix_bits(rows: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Empirical-entropy bits, for every r, of the codes of the rows taken weight[r, i] times
    each (row i): with 0/1 weights, those of a set of rows, such as the first k + 1."""
    lo, width = int(rows.min()), int(rows.max() - rows.min()) + 1
    if width * len(rows) > 4_000_000:  # very fine bins: the values that occur, one r at a time
        _, inv = np.unique(rows, return_inverse=True)
        inv = inv.reshape(rows.shape)
        return np.array([counts_bits(np.bincount(inv.ravel(), np.repeat(w, rows.shape[1]))) for w in weight])
    offsets = (np.arange(len(rows)) * width)[:, None]
    hist = np.bincount((rows - lo + offsets).ravel(), minlength=len(rows) * width).reshape(len(rows), width)
    counts = weight @ hist
    n = counts.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        clog = np.where(counts > 0, counts * np.log2(counts), 0.0)
        return np.where(n > 0, n * np.log2(np.where(n > 0, n, 1.0)), 0.0) - clog.sum(1)


def lower_hull(options: list[Option]) -> list[Option]:
    """The lower convex hull of (err, bits), from the finest (most bits) to the coarsest."""
    pts = sorted(options, key=lambda o: (o.err, o.bits))
    pareto: list[Option] = []
    for o in pts:
        if not pareto or o.bits < pareto[-1].bits:
            pareto.append(o)
    hull: list[Option] = []
    for o in pareto:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment a -> o
            if (b.bits - a.bits) * (o.err - a.err) >= (o.bits - a.bits) * (b.err - a.err):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def options_for(t: Target, lowrank: bool = True) -> list[Option]:
    """The lower hull of t's options."""
    return lower_hull([o for part in _option_parts(t, lowrank) for o in part(t)])


def all_options(targets: list[Target], lowrank: bool = True, threads: int = 1) -> list[list[Option]]:
    """options_for of every target. Where any holds PARALLEL_FROM entries or more, the large
    factorizations come first, one at a time on `threads` BLAS threads, then every target's
    parts (zero, dense, rank-k) are built in `threads` threads, the largest tensors' first:
    numpy leaves the GIL in its work on large arrays (on small ones the threads only contend
    for it). The hulls do not depend on the order the parts are built in; a factorization on
    several BLAS threads may differ from one thread's in its last digits."""
    parts = [_option_parts(t, lowrank) for t in targets]
    jobs = [(t, part) for t, its in zip(targets, parts) for part in its]
    if threads <= 1 or max((t.w.size for t in targets), default=0) < PARALLEL_FROM:
        built = [part(t) for t, part in jobs]
    else:
        with threadpool_limits(threads, user_api="blas"):
            for t in sorted(targets, key=lambda t: -t.w.size):
                _factorize(t, lowrank)
        with ThreadPoolExecutor(threads) as pool:
            order = sorted(range(len(jobs)), key=lambda k: -jobs[k][0].w.size)
            futures = {k: pool.submit(jobs[k][1], jobs[k][0]) for k in order}
            try:
                built = [futures[k].result() for k in range(len(jobs))]
            except BaseException:  # an error or an interrupt: drop the parts not yet started
                pool.shutdown(cancel_futures=True)
                raise
    hulls, at = [], 0
    for its in parts:
        hulls.append(lower_hull([o for options in built[at : at + len(its)] for o in options]))
        at += len(its)
    return hulls


def _option_parts(t: Target, lowrank: bool) -> list[Callable[[Target], list[Option]]]:
    return [_zero_option, _dense_options] + ([_lowrank_options] if lowrank and t.is_matrix else [])


def _factorize(t: Target, lowrank: bool) -> None:
    """Compute (and cache) the factorization that t's options read: the whitened SVD where
    its input moments are known, the plain one where rank-k options are built."""
    if t.h is not None:
        t.whitened()
    elif lowrank and t.is_matrix:
        t.svd()


def _zero_option(t: Target) -> list[Option]:
    """Decoding to zero: the error is |W|^2, or tr(W H W^T) = |W R|^2, the sum of the whitened s_i^2."""
    err = (t.w**2).sum() if t.h is None else (t.whitened()[1] ** 2).sum()
    return [Option("zero", 0.0, float(err))]


def sensitivity(
    t: Target, oracle: LossOracle, base: float, rng: np.random.Generator, r: float = 0.05
) -> tuple[float, float | None]:
    """Loss increase per unit squared error of tensor t, from antithetic uniform noise of r times
    its rms, r adjusted until the loss rises by about PROBE_TARGET; and that r (None where none did).
    A loss that stays bit for bit the same under noise of r >= 0.05 ignores the tensor, or nearly:
    the largest noise, r = 10, is tried at once."""
    rms = float(np.sqrt((t.w**2).mean())) or 1e-3
    direction = rng.uniform(-1.0, 1.0, size=t.w.shape) * math.sqrt(3.0)  # unit variance
    curv, norm2 = 0.0, 1.0
    for _ in range(4):
        z = direction * r * rms
        norm2 = float((z**2).sum())
        plus = oracle({t.name: t.patched(t.w + z)}, constrained=False)  # the loss's curvature alone
        minus = oracle({t.name: t.patched(t.w - z)}, constrained=False)
        curv = (plus + minus) / 2 - base
        if not math.isfinite(curv):
            r /= 10
            continue
        if PROBE_TARGET / 10 <= curv <= PROBE_TARGET * 10:
            return max(curv, 0.0) / norm2, r
        if curv < PROBE_TARGET / 10 and r >= 10:
            break
        if plus == minus == base and r >= 0.05:  # a smaller noise may be below the loss's resolution
            r = 10.0
            continue
        r = float(np.clip(r * math.sqrt(PROBE_TARGET / max(curv, 1e-9)), r / 30, min(r * 30, 10.0)))
    return (max(curv, 0.0) / norm2 if math.isfinite(curv) else 1e6 / norm2), None


def sensitivities(targets: list[Target], oracle: LossOracle, base: float, seed: int) -> list[float]:
    """Every target's sensitivity; each probe starts from the radius on which the last probe of a
    tensor of as many dimensions landed in range (tensors of one kind respond alike)."""
    rng, last, out = np.random.default_rng(seed), {}, []
    for t in targets:
        s, r = sensitivity(t, oracle, base, rng, last.get(t.tensor.ndim, 0.05))
        if r is not None:
            last[t.tensor.ndim] = r
        out.append(s)
    return out


Choice = tuple[tuple[int, ...], tuple[int, ...]]  # (hull index, bin shift) per quantizable tensor


class Search:
    """State of one checkpoint's search, shared by all eps."""

    def __init__(self, targets: list[Target], oracle: LossOracle, base: float, lowrank: bool = True, seed: int = 0):
        self.targets, self.oracle, self.base = targets, oracle, base
        self.free = [t for t in targets if t.quantizable]
        self.hulls = all_options(self.free, lowrank, threads=torch.get_num_threads())
        self.sens = sensitivities(self.free, oracle, base, seed)
        self.paths = [self._path(shrink(self.sens, beta)) for beta in SHRINKAGE]
        self.cache: dict[Choice, float] = {}
        self.tensors: dict[tuple[int, int, int], torch.Tensor] = {}  # (tensor, hull index, shift) -> decoded
        self._entries: dict[int, dict[int, Entry]] = {}  # tensor -> hull index -> entry, the last used

    def _path(self, sens: list[float]) -> list[tuple[int, ...]]:
        """Configurations (hull index per tensor) from the finest to the coarsest."""
        steps = []
        for i, (hull, s) in enumerate(zip(self.hulls, sens)):
            for h in range(len(hull) - 1):
                saved = hull[h].bits - hull[h + 1].bits
                cost = s * (hull[h + 1].err - hull[h].err)
                steps.append((saved / cost if cost > 0 else math.inf, i, h + 1))
        steps.sort(key=lambda x: -x[0])  # hull convexity keeps each tensor's steps in order
        config = [0] * len(self.free)
        path = [tuple(config)]
        for _, i, h in steps:
            config[i] = h
            path.append(tuple(config))
        return path

    def entries(self, choice: Choice | None) -> list[Entry]:
        """Entries of a choice (configuration, shifts); None is the lossless fallback (raw bytes)."""
        free = iter(range(len(self.free)))
        out = []
        for t in self.targets:
            if t.quantizable and choice is not None:
                i = next(free)
                out.append(shifted(self._entry(i, choice[0][i]), choice[1][i]))
            elif not t.part:  # the raw bytes of a split tensor are its first target's
                out.append(raw_entry(t))
        return out

    def loss(self, config: tuple[int, ...], shift: tuple[int, ...] | None = None) -> float:
        shift = shift or (0,) * len(config)
        if (config, shift) not in self.cache:
            state: dict[str, torch.Tensor] = {}
            for i, (t, h, d) in enumerate(zip(self.free, config, shift)):
                add_block(state, t.name, self._tensor(i, h, d))
            self.cache[(config, shift)] = self.oracle(state)
        return self.cache[(config, shift)]

    def _tensor(self, i: int, h: int, shift: int = 0) -> torch.Tensor:
        """Decoded tensor of option h of tensor i (entry_tensor, as the decoder computes it)."""
        if (i, h, shift) not in self.tensors:
            self.tensors[(i, h, shift)] = entry_tensor(shifted(self._entry(i, h), shift))
        return self.tensors[(i, h, shift)]

    def _entry(self, i: int, h: int) -> Entry:
        """Entry of option h of tensor i; every shift of its bins reads the same codes."""
        kept = self._entries.setdefault(i, {})
        entry = kept.pop(h) if h in kept else self.hulls[i][h].entry(self.free[i])
        kept[h] = entry  # the last used go last; a polish step that fails comes back to the kept one
        if len(kept) > max(2, ENTRY_CODES // self.free[i].w.size):
            del kept[next(iter(kept))]
        return entry

    def feasible(self, config: tuple[int, ...], eps: float, shift: tuple[int, ...] | None = None) -> bool:
        return within(self.loss(config, shift), self.base, eps)

    def bits(self, config: tuple[int, ...]) -> float:
        return sum(h[c].bits for h, c in zip(self.hulls, config))

    def starts(self, eps: float) -> list[Choice]:
        """The cheapest choice that each path's search for eps found feasible, distinct ones, fewest
        bits first (the first path's of equals). It depends on eps alone."""
        out: list[Choice] = []
        for p in range(len(self.paths)):
            found = [key for key in self._along(p, eps) if within(self.cache[key], self.base, eps)]
            if found:
                cheapest = min(found, key=lambda key: self.bits(key[0]))  # the first of equals
                if cheapest not in out:
                    out.append(cheapest)
        return sorted(out, key=lambda key: self.bits(key[0]))

    def best(self, eps: float, polish: bool = True) -> Choice | None:
        """The cheapest start for eps (None: lossless), calibrated and polished; from MULTI_START_EPS
        up, the cheapest starts of MULTI_STARTS paths, each refined, the one left with the fewest
        bits. Where the constraint lets the network be badly damaged, the cheapest start can be
        the one with the least room to polish."""
        starts = self.starts(eps)
        if not starts or not polish:
            return starts[0] if starts else None
        tried = starts[: MULTI_STARTS if eps >= MULTI_START_EPS else 1]
        return min((self._refined(choice, eps) for choice in tried), key=lambda c: self.bits(c[0]))

    def _refined(self, choice: Choice, eps: float) -> Choice:
        """Calibration and polish, repeated while the polish changes the configuration."""
        config, shift = choice
        for round_ in range(ROUNDS):
            shift = self._calibrate(config, shift, CALIB_MIN_SHARE if round_ else 0.0)
            polished = self._polish(config, eps, shift)
            if polished == config:
                break
            config = polished
        return config, shift

    def _calibrate(self, config: tuple[int, ...], shift: tuple[int, ...], min_share: float = 0.0) -> tuple[int, ...]:
        """Shifts of the decoded bins (the same codes, scaled by 2^(d/8): no bits) that lower the
        loss, one coded tensor at a time, largest first, two or three loss calls each (_line);
        only those holding at least min_share of the bits.
        Coarse-graining upsets the scale of what a LayerNorm passes on and the confidence of the
        logits; a scale can give some of it back."""
        shift, best = list(shift), self.loss(config, shift)
        options = [hull[h] for hull, h in zip(self.hulls, config)]
        floor = min_share * self.bits(config)
        coded = [i for i, o in enumerate(options) if o.kind != "zero" and o.bits >= floor]
        order = sorted(coded, key=lambda i: -options[i].bits)
        for i in order:
            shift, best = self._line(config, shift, best, i)
        return tuple(shift)

    def _line(self, config: tuple[int, ...], shift: list[int], best: float, i: int) -> tuple[list[int], float]:
        """Tensor i's shift: the loss one step either side and, where one is lower, at the vertex
        of the parabola through the three points (the loss is smooth in a scale), as far as
        MAX_SHIFT allows (all the way where the three are not convex); the lowest point tried."""

        def at(d: int) -> float:
            trial = shift.copy()
            trial[i] = d
            return self.loss(config, tuple(trial)) if abs(d) <= MAX_SHIFT else math.inf

        s0 = shift[i]
        up, down = at(s0 + 1), at(s0 - 1)
        if not min(up, down) < best:
            return shift, best
        step = 1 if up < down else -1
        tried = [(min(up, down), s0 + step)]
        curv = (up + down) / 2 - best
        if math.isfinite(curv):  # not past a bound, and no failed call
            reach = round(min((down - up) / (4 * curv) * step, 2 * MAX_SHIFT)) if curv > 0 else 2 * MAX_SHIFT
            d = s0 + step * min(reach, MAX_SHIFT - step * s0)
            if abs(d - s0) > 1:
                tried.append((at(d), d))
        loss, d = min(tried, key=lambda point: point[0])  # the first of equals
        shift = shift.copy()
        shift[i] = d
        return shift, loss

    def _along(self, p: int, eps: float) -> list[Choice]:
        """Binary search for the last feasible configuration of path p (loss ~ monotone along
        it); returns the points it evaluated, in order.

        Every eps searches the whole path: the loss is not strictly monotone along it, so an
        interval narrowed by another eps can miss a cheaper feasible point. The cache makes
        the shared part of the searches free."""
        path, zero = self.paths[p], (0,) * len(self.free)
        visited = []

        def feasible(i: int) -> bool:
            visited.append((path[i], zero))
            return self.feasible(path[i], eps)

        lo, hi = 0, len(path) - 1
        if feasible(lo) and not feasible(hi):
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
        return visited

    def _polish(self, config: tuple[int, ...], eps: float, shift: tuple[int, ...]) -> tuple[int, ...]:
        """Coarsen single tensors hull step by hull step, largest saving first, while feasible."""
        config = list(config)
        total = self.bits(tuple(config))
        for _ in range(POLISH_PASSES):
            order = sorted(
                (i for i in range(len(config)) if config[i] + 1 < len(self.hulls[i])),
                key=lambda i: self.hulls[i][config[i] + 1].bits - self.hulls[i][config[i]].bits,
            )
            changed = False
            for i in order:
                if self.hulls[i][config[i]].bits < POLISH_MIN_SHARE * total:
                    continue
                coarsest = self._coarsest(config, i, eps, shift)
                if coarsest != config[i]:
                    config[i], changed = coarsest, True
            if not changed:
                break
        return tuple(config)

    def _coarsest(self, config: list[int], i: int, eps: float, shift: tuple[int, ...]) -> int:
        """The coarsest hull point of tensor i found feasible with the others fixed: steps of 1, 2,
        4, ... points while feasible, then a bisection between the last feasible and the first
        infeasible. The real loss is not monotone along a hull (its points alternate between
        kinds and bases), so a far point may hold where a nearer one failed."""

        def feasible(h: int) -> bool:
            trial = config.copy()
            trial[i] = h
            return self.feasible(tuple(trial), eps, shift)

        ok, last, step = config[i], len(self.hulls[i]) - 1, 1
        bad = last + 1
        while ok < last:
            h = min(config[i] + step, last)
            if not feasible(h):
                bad = h
                break
            ok, step = h, 2 * step
        while bad - ok > 1:
            mid = (ok + bad) // 2
            ok, bad = (mid, bad) if feasible(mid) else (ok, mid)
        return ok


def shifted(entry: Entry, shift: int) -> Entry:
    """The entry decoded on bins `shift` grid steps coarser (the first factor's, for lowrank)."""
    if not shift or entry.kind not in ("dense", "lowrank"):
        return entry
    return dataclasses.replace(entry, bins=(entry.bins[0] + shift, *entry.bins[1:]))


def shrink(sens: list[float], beta: float) -> list[float]:
    """Sensitivities pulled toward their geometric mean: s_t^beta (beta = 0: one bin scale for all).

    The noise probe sees each tensor alone and near the original weights; the constraint
    binds where all tensors are coarse at once and the loss is far from quadratic, so the
    probe's spread is trusted only as far as the real loss confirms it."""
    pos = [s for s in sens if s > 0]
    if not pos:
        return sens
    g = math.exp(sum(math.log(s) for s in pos) / len(pos))
    return [g * (s / g) ** beta if s > 0 else 0.0 for s in sens]
