"""Second moments of the inputs of every weight matrix the loss applies as a linear map.

For a weight W used as y = x W^T (``F.linear``, so every ``nn.Linear``), an error dW changes
the outputs on the training inputs by |dW x|^2 summed over them, i.e. by tr(dW H dW^T) with
H = E[x x^T]. A weight used as y = x @ W (``torch.matmul``, the kernel layout of JAX and Flax:
W is inputs x outputs) is the same map with W^T in place of W: its H is over W's rows. The
search measures errors of such matrices in that norm, whitens them before truncating (a
data-aware SVD) and rounds them with error feedback (GPTQ, Frantar et al. 2023). H is read off
one call of the loss closure by a torch function mode; a weight that the loss also uses any
other way (an embedding lookup, a slice, a transpose, a tied readout) gets none, and its errors
are measured in the plain Frobenius norm.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

DAMPING = 0.01  # added to H's diagonal, as a fraction of its mean (GPTQ's default)


@dataclass(frozen=True)
class RowMoments:
    """H of a weight read as x @ W: the second moment of its inputs, over W's rows."""

    h: np.ndarray


# calls x @ W with W second: the same map as F.linear(x, W^T)
_MATMUL = frozenset({torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm})
_TRANSPOSES = frozenset({torch.t, torch.Tensor.t, torch.Tensor.T.__get__, torch.Tensor.mT.__get__})
_OTHER_SIDE = {"columns": "rows", "rows": "columns"}


class _Recorder(TorchFunctionMode):
    """Accumulates X^T X of the inputs of F.linear(x, W), x @ W and einsum calls that apply a W
    that is one of `weights` or its transpose (W.T, W.t(), W.mT) as a linear map, per weight and
    side of W that the inputs meet ("columns" for F.linear(x, W) and x @ W.T, "rows" for x @ W,
    F.linear(x, W.T) and einsum("btd,df->btf", x, W))."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.keys: dict[tuple, str] = {}
        for name, t in weights.items():  # tied weights: the first name, as targets_of keeps it
            self.keys.setdefault(_key(t), name)
        self.flipped: dict[tuple, str] = {}  # transposed views of the weights, made during the call
        self.sums: dict[tuple[str, str], torch.Tensor] = {}
        self.other: set[str] = set()  # weights the loss also reads some other way

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        operands = [a for a in _flat((*args, *kwargs.values())) if isinstance(a, torch.Tensor)]
        if func in _TRANSPOSES and len(operands) == 1 and operands[0].ndim == 2 and _key(operands[0]) in self.keys:
            out = func(*args, **kwargs)
            self.flipped[_key(out)] = self.keys[_key(operands[0])]
            return out
        read = self._einsum(args) if func is torch.einsum else self._linear(func, operands)
        if read:
            x, w, side = read
            if _key(w) in self.flipped:
                side = _OTHER_SIDE[side]
            name, rows = self._name(w), x.detach().reshape(-1, x.shape[-1]).double()
            self.sums[name, side] = self.sums.get((name, side), 0) + rows.T @ rows
            del operands[next(i for i, a in enumerate(operands) if a is w)]  # x may be a weight read another way
        for a in operands:
            if self._name(a):
                self.other.add(self._name(a))
        return func(*args, **kwargs)

    def _linear(self, func, operands: list[torch.Tensor]) -> tuple | None:
        """(x, W, side) of F.linear(x, W, ...) or x @ W with W a tracked matrix, else None."""
        side = "columns" if func is F.linear else "rows" if func in _MATMUL else None
        if side and len(operands) >= 2 and operands[1].ndim == 2 and self._name(operands[1]):
            return operands[0], operands[1], side
        return None

    def _einsum(self, args: tuple) -> tuple | None:
        """(x with the contracted axis last, W, side) of einsum(eq, x, W) or einsum(eq, W, x) that
        contracts one axis of a tracked matrix W with one axis of x and keeps every other axis of
        both (a linear map of x along that axis), else None."""
        tensors = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        if not args or not isinstance(args[0], str) or len(tensors) != 2 or "->" not in args[0] or "." in args[0]:
            return None
        inputs, out = args[0].replace(" ", "").split("->")
        subs = inputs.split(",")
        for w_at in (1, 0):
            w, x, ws, xs = tensors[w_at], tensors[1 - w_at], subs[w_at], subs[1 - w_at]
            if not (isinstance(w, torch.Tensor) and w.ndim == 2 and self._name(w) and isinstance(x, torch.Tensor)):
                continue
            kept = [c for c in ws if c in out]
            if len(set(ws)) != 2 or len(kept) != 1 or kept[0] in xs or len(set(xs)) != len(xs):
                continue
            (axis,) = set(ws) - set(kept)
            if xs.count(axis) != 1 or any(c not in out for c in xs if c != axis):
                continue
            side = "rows" if ws[0] == axis else "columns"
            return x.movedim(xs.index(axis), -1), w, side
        return None

    def _name(self, t: torch.Tensor) -> str | None:
        """The weight t is, or is the transpose of (None: neither)."""
        return self.keys.get(_key(t)) or self.flipped.get(_key(t))


def _flat(values) -> list:
    """values with the items of any list or tuple among them (torch.cat([W, ...]) reads W)."""
    return [v for a in values for v in (a if isinstance(a, (list, tuple)) else (a,))]


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()))


def input_moments(
    loss_fn, module: torch.nn.Module, weights: dict[str, torch.Tensor]
) -> dict[str, np.ndarray | RowMoments]:
    """name -> H, the damped second moment of the inputs of that weight matrix, scaled to mean
    diagonal 1 (so that |dW|_H^2 = tr(dW H dW^T) equals |dW|^2 for white noise), for the 2-D
    weights in `weights` that the loss reads only through F.linear (H over W's columns) or only
    as x @ W (RowMoments: H over W's rows). One call of loss_fn."""
    recorder = _Recorder({k: w for k, w in weights.items() if w.ndim == 2 and w.is_floating_point()})
    with torch.no_grad(), recorder:  # a closure that fails here raises: estimate warns and records it
        loss_fn(module)
    sides = Counter(name for name, _ in recorder.sums)
    out = {}
    for (name, side), total in recorder.sums.items():
        h = total.cpu().numpy()
        mean = float(np.trace(h)) / len(h)
        if name in recorder.other or sides[name] > 1 or not (np.isfinite(mean) and mean > 0):
            continue
        h = (h / mean + DAMPING * np.eye(len(h))) / (1 + DAMPING)
        out[name] = h if side == "columns" else RowMoments(h)
    return out
