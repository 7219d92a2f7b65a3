"""Description lengths (two-part MDL codes) and compression generalization bounds.

Units: code lengths are in bits; losses and KL divergences are in nats (natural log), as
PyTorch's cross-entropy reports them; a length of K bits is K ln 2 nats. Error rates are
fractions in [0, 1] (0-1 loss).

The bounds take K, the code length in bits of the coarse-grained model h, n training
examples and a confidence delta; each holds with probability at least 1 - delta over the draw
of the training set, for every h whose code is fixed before seeing the data (Occam's razor).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq
from scipy.special import rel_entr

# Catoni's free parameter C is chosen from this grid after seeing the data, paid for by a union
# bound (ln of the grid size added to the complexity): 2^-8 .. 2^8 in quarter-octave steps.
CATONI_GRID = np.geomspace(2.0**-8, 2.0**8, 65)

BOUNDS = ("occam", "kl", "catoni")


def _check_n(n) -> None:
    if not (isinstance(n, (int, float, np.integer, np.floating)) and n >= 1 and math.isfinite(n)):
        raise ValueError(f"n (number of examples) must be a finite number >= 1, got {n!r}")


def _check_nonneg(name: str, x) -> None:
    if not (isinstance(x, (int, float, np.integer, np.floating)) and 0 <= x < math.inf):
        raise ValueError(f"{name} must be a finite number >= 0, got {x!r}")


def _check_bound_args(train_err, k_bits, n, delta) -> None:
    if not (isinstance(train_err, (int, float, np.integer, np.floating)) and 0 <= train_err <= 1):
        raise ValueError(f"train_err must be an error rate in [0, 1], got {train_err!r}")
    _check_nonneg("k_bits", k_bits)
    _check_n(n)
    if not (isinstance(delta, (int, float, np.integer, np.floating)) and 0 < delta < 1):
        raise ValueError(f"delta (confidence) must be in (0, 1), got {delta!r}")


# ---------------------------------------------------------------------------------------------
# Description lengths
# ---------------------------------------------------------------------------------------------


def data_bits(mean_loss_nats: float, n: int) -> float:
    """Bits to encode the n training labels given the model: sum_i -log2 p(y_i | x_i).

    With the mean cross-entropy L in nats, that is n * L / ln 2 bits.
    """
    _check_nonneg("mean_loss_nats", mean_loss_nats)
    _check_n(n)
    return n * mean_loss_nats / math.log(2)


def description_bits(model_bits: float, mean_loss_nats: float, n: int) -> float:
    """Two-part MDL code length in bits: L(h) + L(D | h) = model_bits + n * L / ln 2.

    model_bits is the compressed size of the coarse-grained model (bits), mean_loss_nats its
    mean training cross-entropy (nats) over the n training examples.
    """
    _check_nonneg("model_bits", model_bits)
    return model_bits + data_bits(mean_loss_nats, n)


def truth_table_bits(p: int) -> float:
    """Bits of the task's full truth table: p * p * log2(p) (one of p answers for each of p^2
    inputs). 87,087 bits (10.9 kB) for p = 113."""
    if not (isinstance(p, (int, np.integer)) and p >= 2):
        raise ValueError(f"p must be an integer >= 2, got {p!r}")
    return p * p * math.log2(p)


def prefix_free_bits(k: float) -> float:
    """Length in bits of a prefix-free code for a K-bit string: K + 2 log2 K (K >= 1).

    Lotfi et al. 2022, "PAC-Bayes compression bounds so tight that they can explain
    generalization": a prefix-free prior needs the length itself encoded, ~2 log2 K bits.
    """
    if not (isinstance(k, (int, float, np.integer, np.floating)) and 1 <= k < math.inf):
        raise ValueError(f"prefix_free_bits needs a finite K >= 1 bit, got {k!r}")
    return k + 2 * math.log2(k)


def _prefix_free_nats(k_bits: float) -> float:
    # A code shorter than one bit is padded to one bit, where K + 2 log2 K is defined.
    return prefix_free_bits(max(float(k_bits), 1.0)) * math.log(2)


# ---------------------------------------------------------------------------------------------
# Bounds
# ---------------------------------------------------------------------------------------------


def binary_kl(q: float, e: float) -> float:
    """kl(q || e) = q ln(q/e) + (1-q) ln((1-q)/(1-e)), in nats, with 0 ln 0 = 0."""
    return float(rel_entr(q, e) + rel_entr(1.0 - q, 1.0 - e))


def occam_bound(train_err: float, k_bits: float, n: int, delta: float = 0.05) -> float:
    """Occam bound on the test error: train_err + sqrt((K ln 2 + ln(1/delta)) / (2n)).

    K in bits (converted to nats by ln 2). The raw value is returned, even above 1 (vacuous);
    callers judge vacuity.
    """
    _check_bound_args(train_err, k_bits, n, delta)
    return train_err + math.sqrt((k_bits * math.log(2) + math.log(1 / delta)) / (2 * n))


def kl_rhs(k_bits: float, n: int, delta: float = 0.05) -> float:
    """Right side of the kl bound, in nats: (K' ln 2 + ln(2 sqrt(n) / delta)) / n, K' = K + 2 log2 K."""
    _check_bound_args(0.0, k_bits, n, delta)
    return (_prefix_free_nats(k_bits) + math.log(2 * math.sqrt(n) / delta)) / n


def kl_bound(train_err: float, k_bits: float, n: int, delta: float = 0.05) -> float:
    """kl (Langford-Seeger / Maurer) bound on the test error, with a prefix-free code length:

        the largest e in [train_err, 1] with kl(train_err || e) <= (K' ln 2 + ln(2 sqrt(n)/delta)) / n,

    K' = K + 2 log2 K bits, kl the binary KL divergence in nats. kl(q || .) increases on [q, 1],
    so e is its root (closed form 1 - exp(-rhs) at q = 0, Brent's method otherwise). Returns 1.0
    when no e < 1 representable in floating point satisfies it (vacuous). The bound tends to 1
    only asymptotically: values like 1 - 1e-15 are as vacuous as 1.0, so compare with the
    chance error 1 - 1/p, not with 1.
    """
    _check_bound_args(train_err, k_bits, n, delta)
    q = float(train_err)
    rhs = kl_rhs(k_bits, n, delta)
    if q == 0.0:
        return float(-math.expm1(-rhs))
    hi = math.nextafter(1.0, 0.0)
    if q >= hi or binary_kl(q, hi) <= rhs:
        return 1.0
    return float(brentq(lambda e: binary_kl(q, e) - rhs, q, hi, xtol=1e-15, rtol=4 * np.finfo(float).eps))


def catoni_bound(train_err: float, k_bits: float, n: int, delta: float = 0.05, grid=None) -> float:
    """Catoni's bound on the test error (as used by Lotfi et al. 2022), prefix-free length K':

        min over C in grid of (1 - exp(-C train_err - (K' ln 2 + ln(1/delta) + ln|grid|) / n)) / (1 - exp(-C)).

    Catoni's bound holds for each fixed C > 0; choosing C from the grid after seeing the data
    costs a union bound, the ln|grid| nats above (grid defaults to CATONI_GRID, 65 values
    2^-8..2^8). K' = K + 2 log2 K bits; the exponent is in nats. Capped at 1.0 (vacuous).
    """
    _check_bound_args(train_err, k_bits, n, delta)
    c = CATONI_GRID if grid is None else np.asarray(grid, dtype=float)
    if c.ndim != 1 or c.size == 0 or not np.all(c > 0):
        raise ValueError("grid must be a non-empty 1-D array of positive C values")
    r = (_prefix_free_nats(k_bits) + math.log(1 / delta) + math.log(c.size)) / n
    values = -np.expm1(-c * train_err - r) / -np.expm1(-c)
    return float(min(values.min(), 1.0))


_BOUND_FUNCS = {"occam": occam_bound, "kl": kl_bound, "catoni": catoni_bound}


def nonvacuous_bits(
    train_err: float, n: int, delta: float = 0.05, threshold: float | None = None, bound: str = "kl"
) -> float:
    """Largest code length K (bits) for which the chosen bound ("occam", "kl", "catoni") is
    below `threshold`; 0.0 if none (the bound at K = 0 is already at or above it).

    threshold defaults to 1.0; pass the chance error 1 - 1/p for a meaningful target (the kl
    and Catoni bounds approach 1 only asymptotically, so at threshold 1.0 they count K as
    "non-vacuous" until the bound rounds to 1 in floating point, ~50 n bits). Every bound is
    non-decreasing in K; K is found by bisection to a relative precision of 1e-9.
    """
    if bound not in _BOUND_FUNCS:
        raise ValueError(f"unknown bound {bound!r}; choose one of {BOUNDS}")
    threshold = 1.0 if threshold is None else threshold
    if not (isinstance(threshold, (int, float, np.integer, np.floating)) and 0 < threshold <= 1):
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    f = _BOUND_FUNCS[bound]
    if f(train_err, 0.0, n, delta) >= threshold:  # also validates the arguments
        return 0.0
    lo, hi = 0.0, 1.0
    while f(train_err, hi, n, delta) < threshold:
        lo, hi = hi, 2 * hi
        if hi > 2.0**80:  # unreachable for threshold <= 1: every bound reaches 1.0 by then
            return math.inf
    while hi - lo > 1e-9 * hi:
        mid = 0.5 * (lo + hi)
        if f(train_err, mid, n, delta) < threshold:
            lo = mid
        else:
            hi = mid
    return lo
