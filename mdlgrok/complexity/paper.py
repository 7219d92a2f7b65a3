"""The paper's estimator, kept faithful so both can be compared on the same checkpoint.

DeMoss et al. (2024), sec. 3: every matrix is truncated to the rank where the cumulative
singular values reach tau, stored as factors (U_k S_k, V_k^T) when k(m+n) < mn, every
array is rounded to a grid of bin delta, and the size is bz2(pickle(float32 arrays)).
One global (tau, delta) is chosen by Bayesian optimization over tau in [0, 1] and
log10 delta in [-3, 0]: 2 fixed probes, 10 random points, 50 guided points, for each eps
separately; an infeasible point scores a flat -3e5.

Kept as the paper ran it: the off-by-one rank (``paper_rank``), one delta for every tensor,
float32 bytes instead of integer codes, one search per eps. Not kept: the constraint is
checked with the caller's loss closure (the full training set) unless ``constraint_fn``
gives the paper's last-minibatch check, and the reported figure is the smallest point
that is feasible on the full loss (an infeasible point is never reported).
"""

from __future__ import annotations

import bz2
import io
import math
import pickle
import time
from collections.abc import Callable

import numpy as np
import torch

from mdlgrok.complexity.coarse import paper_rank, rank_for_tau, targets_of
from mdlgrok.complexity.estimate import PAPER_EPS
from mdlgrok.complexity.payload import matrix_shape
from mdlgrok.complexity.search import LossOracle

INFEASIBLE_SCORE = -3e5  # the paper's flat score for a point violating the constraint
PROBES = ({"tau": 1.0, "log_delta": -3.0}, {"tau": 0.5, "log_delta": -1.5})  # the 2 fixed probes
INIT_POINTS, N_ITER = 10, 50


def coarse_arrays(targets, tau: float, delta: float, rank_rule=paper_rank) -> dict[str, list[np.ndarray]]:
    """The paper's coarse-graining: float32 arrays rounded to multiples of delta."""
    out = {}
    for t in targets:
        if not t.quantizable:
            continue
        if t.is_matrix:
            u, s, vt = t.svd()
            k = rank_rule(s, tau)
            m, n = matrix_shape(t.shape)
            arrays = [u[:, :k] * s[:k], vt[:k]] if k * (m + n) < m * n else [t.w.reshape(m, n)]
        else:
            arrays = [t.w]
        out[t.name] = [(np.round(a / delta) * delta).astype(np.float32) for a in arrays]
    return out


def size_bytes(arrays: dict[str, list[np.ndarray]]) -> bytes:
    """bz2(pickle(...)): the paper's description and its length."""
    return bz2.compress(pickle.dumps(arrays, protocol=4))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays in dicts and lists, nothing else: no code runs."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def decode_paper(payload: bytes, shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """Weights from a paper payload (factors multiplied; reshaped to `shapes` where given, else
    the matrix shape: pass the model's shapes for tensors of more than two dimensions). The
    tensors it holds are those the paper coarse-grains; load with strict=False."""
    arrays = _ArrayUnpickler(io.BytesIO(bz2.decompress(payload))).load()
    shapes = shapes or {}
    return {
        name: torch.from_numpy(_product(a).reshape(shapes.get(name, _product(a).shape))) for name, a in arrays.items()
    }


def _product(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] @ arrays[1] if len(arrays) == 2 else arrays[0]


def paper_estimate(
    model: torch.nn.Module,
    loss_fn: Callable,
    eps=PAPER_EPS,
    *,
    eval_fn=None,
    seed: int = 0,
    constraint_fn: Callable | None = None,
    rank_rule=paper_rank,
):
    """The paper's procedure: one Bayesian-optimization search per eps; Results like `estimate`'s,
    whose payloads `decode_paper` reads. constraint_fn(module) -> loss on one minibatch
    reproduces the paper's last-minibatch check (the reported coarse loss is still loss_fn's)."""
    from mdlgrok.complexity.estimate import NaiveSize, Result, base_loss, check_eps, check_repeatable

    eps = check_eps(eps)
    oracle = LossOracle(model, loss_fn)
    base = base_loss(oracle)
    check_repeatable(oracle, base)
    check = LossOracle(model, constraint_fn) if constraint_fn else None
    check_base = base_loss(check) if check else base
    targets = targets_of(oracle.original)
    shapes = {t.name: t.shape for t in targets}
    naive = NaiveSize(model)
    results = []
    for e in eps:
        t0, calls0, inside0 = time.perf_counter(), oracle.calls, oracle.seconds
        points: list[tuple[bytes, float, tuple[float, float]]] = []

        def objective(tau: float, log_delta: float, e: float = e, points: list = points) -> float:
            payload = size_bytes(coarse_arrays(targets, tau, 10.0**log_delta, rank_rule))
            state = decode_paper(payload, shapes)
            loss = oracle(state)
            judged = check(state) if check else loss
            points.append((payload, loss, (tau, log_delta)))
            return -len(payload) if judged <= check_base + e else INFEASIBLE_SCORE

        _bayes_opt(objective, seed)
        feasible = [p for p in points if p[1] <= base + e]
        if feasible:
            payload, loss, (tau, log_delta) = min(feasible, key=lambda p: len(p[0]))
        else:  # nothing met the constraint: the lossless float32 weights
            payload = size_bytes({t.name: [t.w.astype(np.float32)] for t in targets if t.quantizable})
            # measured, not assumed: float32 is lossless only for float32 (and narrower) weights
            loss, tau, log_delta = oracle(decode_paper(payload, shapes)), 1.0, -math.inf
        extra = _paper_extra(eval_fn, oracle, payload, shapes)
        results.append(
            Result(
                e,
                8 * len(payload),
                payload,
                "bz2-pickle",
                {"bz2-pickle": 8 * len(payload)},
                naive,
                base,
                loss,
                paper_choices(payload, tau, 10.0**log_delta),
                oracle.calls - calls0,
                time.perf_counter() - t0,
                "paper",
                extra,
                loss_seconds=oracle.seconds - inside0,
            )
        )
    return results


def paper_choices(payload: bytes, tau: float, delta: float) -> list[dict]:
    """Per coded tensor, as estimate's choices: name, kind (lowrank or dense), rank, bins, and
    the global tau of the search."""
    arrays = _ArrayUnpickler(io.BytesIO(bz2.decompress(payload))).load()
    return [
        {
            "name": name,
            "kind": "lowrank" if len(a) == 2 else "dense",
            "rank": a[0].shape[1] if len(a) == 2 else None,
            "bins": [delta] * len(a),
            "rows": None,
            "fourier": None,
            "transposed": None,
            "tau": tau,
        }
        for name, a in arrays.items()
    ]


def _bayes_opt(objective: Callable[[float, float], float], seed: int) -> None:
    from bayes_opt import BayesianOptimization

    opt = BayesianOptimization(
        f=objective,
        pbounds={"tau": (0.0, 1.0), "log_delta": (-3.0, 0.0)},
        random_state=seed,
        verbose=0,
        allow_duplicate_points=True,
    )
    for probe in PROBES:
        opt.probe(params=probe, lazy=True)
    opt.maximize(init_points=INIT_POINTS, n_iter=N_ITER)


def _paper_extra(eval_fn, oracle: LossOracle, payload: bytes, shapes) -> dict[str, float]:
    if eval_fn is None:
        return {}
    return {k: float(v) for k, v in eval_fn(oracle.place(decode_paper(payload, shapes))).items()}


__all__ = ["paper_estimate", "coarse_arrays", "decode_paper", "rank_for_tau", "paper_rank"]
