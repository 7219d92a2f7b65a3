"""The public estimator: complexity of any torch module at a set of loss tolerances.

    C_eps(theta) = min over coarse-grainings T of |code(T(theta))|
                   subject to L_train(T(theta)) <= L_train(theta) + eps

Every figure returned is the length of a real payload that ``decode`` turns back into
weights whose loss was evaluated with the caller's own closure and met the constraint.
"""

from __future__ import annotations

import bz2
import math
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from threadpoolctl import threadpool_limits

from mdlgrok.complexity.coarse import Target, split_rows, targets_of
from mdlgrok.complexity.moments import input_moments
from mdlgrok.complexity.payload import Entry, bin_width, decode, encode_all
from mdlgrok.complexity.search import LossError, LossOracle, Search, within

PAPER_EPS = (4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625)
REPEAT_TOLERANCE = 1e-6  # relative: how far a second loss call on the same weights may stray


@dataclass
class Result:
    """Complexity of one checkpoint at one eps."""

    eps: float  # tolerance, nats
    bits: int  # 8 * len(payload)
    payload: bytes = field(repr=False)
    codec: str  # the codec of the shortest payload
    codec_bits: dict[str, int]  # every codec's payload size, bits
    naive: NaiveSize = field(repr=False, compare=False)  # the paper's baseline size: see naive_bits
    base_loss: float  # loss of the original model, nats
    coarse_loss: float  # loss of decode(payload), nats; <= base_loss + eps
    choices: list[dict]  # per tensor: name, kind, rank, bins, rows (see choices_of)
    loss_evals: int  # loss calls of the whole search (shared by all eps)
    seconds: float  # wall time of the whole search (shared by all eps)
    estimator: str = "mdlgrok"  # "mdlgrok" (estimate) or "paper" (paper_estimate)
    extra: dict[str, float] = field(default_factory=dict)  # eval_fn of the coarse model
    norms: str = ""  # how errors were measured: "data-aware", or "frobenius (why)"
    min_accuracy: float = math.nan  # the accuracy constraint: accuracy_fn(decoded) >= this (nan: none)
    loss_seconds: float = 0.0  # of `seconds`, the time inside the search's loss (and accuracy) calls

    @property
    def search_over_loss(self) -> float:
        """The search's own time (all but the loss calls) per second inside the loss calls."""
        return (self.seconds - self.loss_seconds) / self.loss_seconds if self.loss_seconds > 0 else math.inf

    @property
    def naive_bits(self) -> int:
        """bzip2 of the raw float32 weights, per tensor (the paper's baseline), computed on first use."""
        return self.naive.bits

    @property
    def ratio(self) -> float:
        return self.naive_bits / self.bits


def naive_bits(model: torch.nn.Module) -> int:
    """bzip2 of each parameter's raw float32 bytes, summed (the paper's 'naive' size), in bits."""
    return NaiveSize(model).bits


class NaiveSize:
    """naive_bits of a model as its parameters are now (their float32 bytes are copied), computed
    on first use and then kept. bzip2 of a large model takes about as long as a search on it,
    and the search does not need it: an estimate leaves it to whoever reads it."""

    def __init__(self, model: torch.nn.Module):
        self._raw: list[bytes] | None = [p.detach().float().cpu().numpy().tobytes() for p in model.parameters()]
        self._bits: int | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # a pickled Result (e.g. sent back from a worker) carries the size
        return {"bits": self.bits}

    def __setstate__(self, state: dict) -> None:
        self._raw, self._bits, self._lock = None, state["bits"], threading.Lock()

    @property
    def bits(self) -> int:
        with self._lock:  # one computation, whichever Result of an estimate reads it first
            if self._bits is None:
                self._bits = 8 * sum(len(bz2.compress(raw)) for raw in self._raw)
                self._raw = None
        return self._bits


def choices_of(entries: list[Entry]) -> list[dict]:
    """Per entry: name, kind, rank, bin widths, rows: how many rows are coded where the loss
    reads only some (the others decode to zero), else None, fourier: how many leading rows (of
    the matrix, or of its factor A) are coded as Fourier coefficients, else None, and transposed:
    True where the codes describe the matrix's transpose (a weight read as x @ W), else None."""
    return [
        {
            "name": e.name,
            "kind": e.kind,
            "rank": e.rank,
            "bins": [bin_width(j) for j in e.bins],
            "rows": len(e.rows) or None,
            "fourier": e.fourier or None,
            "transposed": e.transposed or None,
        }
        for e in entries
    ]


def check_eps(eps, accuracy: bool = False) -> list[float]:
    """eps as floats: positive and finite, or inf where an accuracy constraint is the only one."""
    eps = [float(e) for e in ([eps] if isinstance(eps, (int, float)) else eps)]
    if not eps or any(not (e > 0 and (math.isfinite(e) or accuracy)) for e in eps):
        what = "positive number of nats (inf: accuracy alone)" if accuracy else "positive finite number of nats"
        raise ValueError(f"every eps must be a {what}, got {eps}")
    return eps


def accuracy_floor(model, accuracy_fn, drop: float) -> tuple[Callable | None, float]:
    """The accuracy constraint: a test that a module's accuracy_fn is at most `drop` below the
    model's own, and that floor (None and nan without accuracy_fn)."""
    if accuracy_fn is None:
        if drop:
            raise ValueError("accuracy_drop needs an accuracy_fn")
        return None, math.nan
    if not 0 <= drop < 1:
        raise ValueError(f"accuracy_drop must be in [0, 1), got {drop}")
    floor = float(accuracy_fn(model)) - drop

    def accept(module) -> bool:
        return float(accuracy_fn(module)) >= floor

    return accept, floor


def base_loss(oracle: LossOracle) -> float:
    value = oracle({}, constrained=False)
    if oracle.accept is not None and not oracle.accept(oracle.probe):
        raise ValueError("accuracy_fn gave the original model two different accuracies: it must be deterministic")
    if not math.isfinite(value):
        raise LossError("the loss closure returned a non-finite value for the original model")
    return value


def check_repeatable(oracle: LossOracle, base: float) -> None:
    """A LossError unless the loss of the original weights, asked again, is base (within
    REPEAT_TOLERANCE: last digits of a non-deterministic reduction pass): every figure is a
    loss compared with base, so a closure that draws its batch or its dropout anew each call
    cannot be measured."""
    again = oracle({}, constrained=False)
    if not abs(again - base) <= REPEAT_TOLERANCE * max(1.0, abs(base)):
        raise LossError(
            f"the loss closure gave {base:.6g} and then {again:.6g} for the same weights: it must be "
            "deterministic (the module in eval mode, the same examples every call)"
        )


def read_rows(oracle: LossOracle, base: float) -> dict[str, tuple[int, ...]]:
    """For tensors whose last rows the loss never reads (a positional table longer than the
    sequence), the rows it reads: name -> (0, ..., r - 1).

    A row block counts as unread when filling it with NaN leaves the loss bit for bit
    unchanged (any read of a NaN, even times zero, makes the loss NaN); a binary search finds
    the shortest prefix that holds every read row. One loss call per matrix whose last row is
    read, two for one that is not read at all, two plus about log2(rows) for the others, and one
    final check that zeroing all unread rows at once leaves the loss unchanged (else no rows
    are dropped)."""
    rows = {}
    for name, t in oracle.original.items():
        if not t.is_floating_point() or t.ndim < 2 or t.shape[0] < 2 or _reads_from(oracle, base, name, t.shape[0] - 1):
            continue
        if not _reads_from(oracle, base, name, 0):  # no row read: the search's zero option covers it
            continue
        lo, hi = 1, t.shape[0] - 1  # rows hi.. are unread; find the smallest such hi
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if _reads_from(oracle, base, name, mid) else (lo, mid)
        rows[name] = tuple(range(hi))
    if rows:
        trimmed = {k: _filled(oracle.original[k], len(r), 0.0) for k, r in rows.items()}
        if oracle(trimmed) != base:
            return {}
    return rows


def _filled(t: torch.Tensor, start: int, value: float) -> torch.Tensor:
    out = t.clone()
    out[start:] = value
    return out


def _reads_from(oracle: LossOracle, base: float, name: str, start: int) -> bool:
    """Whether the loss reads any of rows start.. of tensor `name` (NaN there changes it)."""
    try:
        return oracle({name: _filled(oracle.original[name], start, math.nan)}) != base
    except LossError:  # a closure that refuses NaN weights reads them
        return True


def estimate(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module], float],
    eps=PAPER_EPS,
    *,
    lowrank: bool = True,
    polish: bool = True,
    data_aware: bool = True,
    eval_fn: Callable | None = None,
    seed: int = 0,
    accuracy_fn: Callable[[torch.nn.Module], float] | None = None,
    accuracy_drop: float = 0.0,
) -> list[Result]:
    """Complexity of `model` at every eps; one Result per eps, in the order given.

    loss_fn(module) -> mean training loss (nats) of that module; it may update buffers (a batch
    norm's running statistics) but must not write into parameters. eval_fn(module) -> dict of
    extra metrics (test loss, accuracies) recorded for the coarse model. lowrank=False is
    the "quantization alone" baseline. data_aware=False measures every error in the plain
    Frobenius norm (no input moments, no error feedback). The paper's own procedure is
    `paper_estimate`, with Results of the same shape.

    accuracy_fn(module) -> training accuracy adds a second constraint: the decoded model's
    accuracy at most accuracy_drop below the original's. With it, eps may be inf (accuracy alone).
    """
    eps = check_eps(eps, accuracy=accuracy_fn is not None)
    accept, floor = accuracy_floor(model, accuracy_fn, accuracy_drop)
    start = time.perf_counter()
    naive = NaiveSize(model)
    oracle = LossOracle(model, loss_fn, accept)
    base = base_loss(oracle)
    check_repeatable(oracle, base)
    rows = read_rows(oracle, base)
    oracle.restore()  # the moments are read off the original weights
    aware, norms = aware_targets(oracle, data_aware, rows)
    # numpy's BLAS on one thread (search.all_options raises it for a large model's factorizations);
    # torch keeps its own
    with threadpool_limits(1, user_api="blas"):
        search = Search(aware, oracle, base, lowrank=lowrank, seed=seed)
        verified = verified_payloads(search, eps, polish)
    seconds = time.perf_counter() - start
    results = []
    for e in eps:
        payload, loss, sizes, entries = verified[e]
        extra = _extra(eval_fn, oracle, payload)
        results.append(
            Result(
                e,
                8 * len(payload),
                payload,
                min(sizes, key=sizes.get),
                sizes,
                naive,
                base,
                loss,
                choices_of(entries),
                oracle.calls,
                seconds,
                "mdlgrok",
                extra,
                norms,
                floor,
                oracle.seconds,
            )
        )
    return results


def aware_targets(oracle: LossOracle, data_aware: bool, rows: dict) -> tuple[list[Target], str]:
    """The targets of the data-aware search, with the input moments of the linear maps they can
    use (coarse.targets_of), and how errors will be measured. A closure that cannot run under
    the recorder leaves the plain norms, with a warning and a note in every Result."""
    moments, norms = {}, "frobenius (data_aware=False)"
    if data_aware:
        try:
            moments, norms = input_moments(oracle.loss_fn, oracle.probe, oracle.slots), ""
        except Exception as exc:  # the closure, not the search: say so, measure in plain norms
            warnings.warn(
                f"input moments could not be read ({type(exc).__name__}: {exc}); "
                "errors are measured in Frobenius norms",
                stacklevel=3,
            )
            norms = f"frobenius (input moments unreadable: {type(exc).__name__})"
    targets = split_rows(targets_of(oracle.original, rows, moments))
    if not norms:
        aware = any(t.h is not None for t in targets)
        norms = "data-aware" if aware else "frobenius (no matrix read only as a linear map)"
    return targets, norms


def verified_payloads(search: Search, eps: list[float], polish: bool) -> dict[float, tuple]:
    """Per eps, the verified payload of the search's best choice; where its decoded weights miss
    the constraint, the lossless payload (raw bytes), never an unchecked figure. Eps that agree
    on a choice share one check."""
    checked, out = {}, {}
    for e in eps:
        for choice in (search.best(e, polish=polish), None):  # None: lossless
            if choice not in checked:
                checked[choice] = verify(search.entries(choice), search.oracle)
            if choice is None or within(checked[choice][1], search.base, e):
                out[e] = checked[choice]
                break
    return out


def verify(entries: list[Entry], oracle: LossOracle) -> tuple[bytes, float, dict[str, int], list[Entry]]:
    """Encode with every codec, keep the shortest, decode it and evaluate the decoded weights."""
    payloads = encode_all(entries)
    best = min(payloads.values(), key=len)
    loss = oracle(decode(best))
    return best, loss, {k: 8 * len(v) for k, v in payloads.items()}, entries


def _extra(eval_fn, oracle: LossOracle, payload: bytes) -> dict[str, float]:
    if eval_fn is None:
        return {}
    return {k: float(v) for k, v in eval_fn(oracle.place(decode(payload))).items()}
