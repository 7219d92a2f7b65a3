"""Second moments of the inputs of every weight matrix the loss applies as a linear map.

For a weight W used as y = x W^T (``F.linear``, so every ``nn.Linear``), an error dW changes
the outputs on the training inputs by |dW x|^2 summed over them, i.e. by tr(dW H dW^T) with
H = E[x x^T]. The search measures errors of such matrices in that norm, whitens them before
truncating (a data-aware SVD) and rounds them with error feedback (GPTQ, Frantar et al.
2023). H is read off one call of the loss closure by a torch function mode; a weight that the
loss also uses any other way (an embedding lookup, a slice, a tied readout) gets none, and
its errors are measured in the plain Frobenius norm.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

DAMPING = 0.01  # added to H's diagonal, as a fraction of its mean (GPTQ's default)


class _Recorder(TorchFunctionMode):
    """Accumulates X^T X of the inputs of F.linear calls whose weight is one of `weights`."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.keys: dict[tuple, str] = {}
        for name, t in weights.items():  # tied weights: the first name, as targets_of keeps it
            self.keys.setdefault(_key(t), name)
        self.sums: dict[str, torch.Tensor] = {}
        self.other: set[str] = set()  # weights the loss also reads some other way

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        operands = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if func is F.linear and len(operands) >= 2 and _key(operands[1]) in self.keys:
            x, name = operands[0], self.keys[_key(operands[1])]
            x = x.detach().reshape(-1, x.shape[-1]).double()
            self.sums[name] = self.sums.get(name, 0) + x.T @ x
            operands = operands[2:]
        for a in operands:
            if _key(a) in self.keys:
                self.other.add(self.keys[_key(a)])
        return func(*args, **kwargs)


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()))


def input_moments(loss_fn, module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """name -> H, the damped second moment of the inputs of that weight matrix, scaled to mean
    diagonal 1 (so that |dW|_H^2 = tr(dW H dW^T) equals |dW|^2 for white noise), for the 2-D
    weights in `weights` that the loss reads only through F.linear. One call of loss_fn."""
    recorder = _Recorder({k: w for k, w in weights.items() if w.ndim == 2 and w.is_floating_point()})
    with torch.no_grad(), recorder:  # a closure that fails here raises: estimate warns and records it
        loss_fn(module)
    out = {}
    for name, total in recorder.sums.items():
        h = total.cpu().numpy()
        mean = float(np.trace(h)) / len(h)
        if name in recorder.other or not (np.isfinite(mean) and mean > 0):
            continue
        h = h / mean + DAMPING * np.eye(len(h))
        out[name] = h / (1 + DAMPING)
    return out
