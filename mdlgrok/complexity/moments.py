"""Second moments of the inputs of every weight matrix the loss applies as a linear map.

For a weight W used as y = x W^T (``F.linear``, so every ``nn.Linear``), an error dW changes
the outputs on the training inputs by |dW x|^2 summed over them, i.e. by tr(dW H dW^T) with
H = E[x x^T]. A weight used as y = x @ W (``torch.matmul``, the kernel layout of JAX and Flax:
W is inputs x outputs) is the same map with W^T in place of W: its H is over W's rows. The
search measures errors of such matrices in that norm, whitens them before truncating (a
data-aware SVD) and rounds them with error feedback (GPTQ, Frantar et al. 2023). H is read off
one call of the loss closure by a torch function mode; a weight that the loss also uses any
other way (an embedding lookup, a slice, a transpose, a tied readout) gets none, and its errors
are measured in the plain Frobenius norm. Of a table read only by lookups (``F.embedding``,
``W[index]``, ``W.index_select(0, index)``), the mode counts how often each row is read: rows
read far more often than most (the '=' and operator tokens, in every example) are searched as a
block of their own (coarse.split_rows).
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


@dataclass(frozen=True)
class RowReads:
    """How many times the loss looked up each row of a table (F.embedding, so every nn.Embedding;
    W[index] and W.index_select(0, index) with an integer index tensor)."""

    counts: np.ndarray


# calls that apply their second operand W to the first as a linear map, and the names of those
# operands as keywords: F.linear(x, W) meets W's columns, x @ W its rows
_LINEAR = {F.linear: ("columns", "input", "weight")}
_LINEAR.update({f: ("rows", "input", "other") for f in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)})
_LINEAR.update({f: ("rows", "input", "mat2") for f in (torch.mm, torch.Tensor.mm)})
# calls that may return a transposed view of a weight
_VIEWS = frozenset(
    {
        torch.t,
        torch.Tensor.t,
        torch.Tensor.T.__get__,
        torch.Tensor.mT.__get__,
        torch.transpose,
        torch.Tensor.transpose,
        torch.Tensor.swapaxes,
        torch.Tensor.swapdims,
        torch.permute,
        torch.Tensor.permute,
    }
)
# calls that read a weight's metadata, not its values
_METADATA = frozenset(
    {
        torch.Tensor.dtype.__get__,
        torch.Tensor.shape.__get__,
        torch.Tensor.device.__get__,
        torch.Tensor.requires_grad.__get__,
        torch.Tensor.ndim.__get__,
        torch.Tensor.size,
        torch.Tensor.dim,
        torch.Tensor.numel,
        torch.Tensor.is_floating_point,
    }
)
_OTHER_SIDE = {"columns": "rows", "rows": "columns"}


def _row_index(table=None, index=None, *rest, **kwargs) -> tuple:
    """(table, index) of table[index], where index picks whole rows (an index tensor alone)."""
    return (table, index) if not isinstance(index, tuple) else (None, None)


def _selected(input=None, dim=None, index=None, *rest, **kwargs) -> tuple:
    """(table, index) of index_select(table, 0, index)."""
    return (input, index) if dim == 0 else (None, None)


def _embedded(input=None, weight=None, *rest, **kwargs) -> tuple:
    """(table, index) of F.embedding(index, table)."""
    return weight, input


# calls that look up whole rows of a table, and how to read (table, row indices) off their arguments
_LOOKUPS = {
    F.embedding: _embedded,
    torch.Tensor.__getitem__: _row_index,
    torch.index_select: _selected,
    torch.Tensor.index_select: _selected,
}


class _Recorder(TorchFunctionMode):
    """Accumulates X^T X of the inputs of F.linear(x, W), x @ W and einsum calls that apply a W
    that is one of `weights` or its transpose (W.T, W.t(), W.transpose(0, 1), ...) as a linear
    map, per weight and side of W that the inputs meet ("columns" for F.linear(x, W) and
    x @ W.T, "rows" for x @ W, F.linear(x, W.T) and einsum("btd,df->btf", x, W)). Reading a
    weight's dtype or shape is no read; any other use of it marks it in `other`."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.keys: dict[tuple, str] = {}
        for name, t in weights.items():  # tied weights: the first name, as targets_of keeps it
            self.keys.setdefault(_key(t), name)
        self.flipped: dict[tuple, str] = {}  # transposed views of the weights, made during the call
        self.sums: dict[tuple[str, str], torch.Tensor] = {}
        self.reads: dict[str, np.ndarray] = {}  # lookups of each row of a table
        self.other: set[str] = set()  # weights the loss also reads some other way

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        operands = [a for a in _flat((*args, *kwargs.values())) if isinstance(a, torch.Tensor)]
        if func in _METADATA:
            return func(*args, **kwargs)
        if func in _LOOKUPS and self._lookup(*_LOOKUPS[func](*args, **kwargs)):
            return func(*args, **kwargs)
        if func in _VIEWS and len(operands) == 1 and operands[0].ndim == 2 and self._name(operands[0]):
            return self._view(func(*args, **kwargs), operands[0])
        read = self._einsum(args) if func is torch.einsum else self._linear(func, args, kwargs)
        if read and not self._name(read[0]):  # a product of two weights is no map of the data
            x, w, side = read
            if _key(w) not in self.keys:  # a transposed view: the inputs meet W's other side
                side = _OTHER_SIDE[side]
            name, rows = self._name(w), x.detach().reshape(-1, x.shape[-1]).double()
            self.sums[name, side] = self.sums.get((name, side), 0) + rows.T @ rows
            del operands[next(i for i, a in enumerate(operands) if a is w)]
        for a in operands:
            if self._name(a):
                self.other.add(self._name(a))
        return func(*args, **kwargs)

    def _lookup(self, weight, index) -> bool:
        """Count the rows of a tracked table that `index` (integers) looks up; False where weight
        is none of them (or a transposed view) or index is no integer tensor."""
        if not (isinstance(weight, torch.Tensor) and isinstance(index, torch.Tensor)) or index.is_floating_point():
            return False
        name = self.keys.get(_key(weight))
        if name is None or index.dtype in (torch.bool, torch.uint8) or not len(weight):  # masks, not rows
            return False
        rows = index.detach().reshape(-1).cpu().numpy() % len(weight)  # negative indices count from the end
        self.reads[name] = self.reads.get(name, 0) + np.bincount(rows, minlength=len(weight))
        return True

    def _name(self, t: torch.Tensor) -> str | None:
        """The weight t is, or is the transpose of (None: neither)."""
        return self.keys.get(_key(t)) or self.flipped.get(_key(t))

    def _view(self, out, weight: torch.Tensor):
        """out, a view of a tracked weight: registered where it is the weight's transpose (or the
        weight itself, or the transpose of its transpose: known already), else a read of it."""
        name = self._name(weight)
        flipped = (weight.data_ptr(), tuple(weight.shape[::-1]), tuple(weight.stride()[::-1]))
        if isinstance(out, torch.Tensor) and _key(out) == flipped:
            if _key(out) not in self.keys:
                self.flipped[_key(out)] = name
        elif not (isinstance(out, torch.Tensor) and self._name(out)):
            self.other.add(name)
        return out

    def _linear(self, func, args: tuple, kwargs: dict) -> tuple | None:
        """(x, W, side) of F.linear(x, W, ...), x @ W or mm(x, W) with W a tracked matrix, else None."""
        if func not in _LINEAR:
            return None
        side, x_name, w_name = _LINEAR[func]
        x = args[0] if args else kwargs.get(x_name)
        w = args[1] if len(args) > 1 else kwargs.get(w_name)
        if isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and w.ndim == 2 and self._name(w):
            return x, w, side
        return None

    def _einsum(self, args: tuple) -> tuple | None:
        """(x with the contracted axis last, W, side) of einsum(eq, x, W) or einsum(eq, W, x) that
        contracts one axis of a tracked matrix W with one axis of x and keeps every other axis of
        both (a linear map of x along that axis; x's may include an ellipsis), else None."""
        tensors = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        if not args or not isinstance(args[0], str) or len(tensors) != 2 or "->" not in args[0]:
            return None
        inputs, out = args[0].replace(" ", "").split("->")
        subs = inputs.split(",")
        for w_at in (1, 0):
            w, x, ws, xs = tensors[w_at], tensors[1 - w_at], subs[w_at], subs[1 - w_at]
            if not (isinstance(w, torch.Tensor) and w.ndim == 2 and self._name(w) and isinstance(x, torch.Tensor)):
                continue
            letters, kept = xs.replace("...", ""), [c for c in ws if c in out]
            if "." in ws + letters or ("..." in xs) != ("..." in out) or len(set(letters)) != len(letters):
                continue
            if len(set(ws)) != 2 or len(kept) != 1 or kept[0] in letters:
                continue
            (axis,) = set(ws) - set(kept)
            if axis not in letters or any(c not in out for c in letters if c != axis):
                continue
            before, _, after = xs.partition("...")
            at = before.index(axis) if axis in before else x.ndim - len(after) + after.index(axis)
            return x.movedim(at, -1), w, "rows" if ws[0] == axis else "columns"
        return None


def _flat(values) -> list:
    """values with the items of any list or tuple among them (torch.cat([W, ...]) reads W)."""
    return [v for a in values for v in (a if isinstance(a, (list, tuple)) else (a,))]


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()))


def input_moments(
    loss_fn, module: torch.nn.Module, weights: dict[str, torch.Tensor]
) -> dict[str, np.ndarray | RowMoments | RowReads]:
    """name -> H, the damped second moment of the inputs of that weight matrix, scaled to mean
    diagonal 1 (so that |dW|_H^2 = tr(dW H dW^T) equals |dW|^2 for white noise), for the 2-D
    weights in `weights` that the loss reads only through F.linear (H over W's columns) or only
    as x @ W (RowMoments: H over W's rows); and for a table that it reads only by lookups,
    how often each row is looked up (RowReads). One call of loss_fn."""
    recorder = _Recorder({k: w for k, w in weights.items() if w.ndim == 2 and w.is_floating_point()})
    with torch.no_grad(), recorder:  # a closure that fails here raises: estimate warns and records it
        loss_fn(module)
    sides = Counter(name for name, _ in recorder.sums)
    out = {}
    for (name, side), total in recorder.sums.items():
        h = total.cpu().numpy()
        mean = float(np.trace(h)) / len(h)
        read_twice = name in recorder.other or name in recorder.reads or sides[name] > 1
        if read_twice or not (np.isfinite(mean) and mean > 0):
            continue
        h = (h / mean + DAMPING * np.eye(len(h))) / (1 + DAMPING)
        out[name] = h if side == "columns" else RowMoments(h)
    for name, counts in recorder.reads.items():
        if name not in recorder.other and name not in sides:
            out[name] = RowReads(counts)
    return out
