"""Nanda et al.'s progress measures (arXiv 2301.05217) for the modular group operations, on
mdlgrok's [a, OP, b, EQ] inputs and post-LayerNorm transformer.

Each task is a cyclic group Z_n in coordinates (`CyclicCoordinates`): add and sub on the
residues themselves (n = p), mul and div on the discrete logarithm of the non-zero residues
(n = p - 1, p prime, residue g^i at coordinate i for the smallest primitive root g), so that
the label sits at coordinate i + s j (s = +1 for add and mul, -1 for sub and div). Inputs
with a zero operand in mul and div lie outside the group and are left out.

Fourier basis F (n x n): row 0 = 1/sqrt(n); rows 2k-1, 2k = cos, sin(2 pi k x / n),
normalized, k = 1..(n-1)/2; for even n a last row cos(pi x) for k = n/2.
- key frequencies: for each neuron of the last block's MLP (last position, all n^2 inputs,
  centered), the share of its squared norm in frequency k's linear and quadratic 2-D Fourier
  terms; a neuron with a share >= 0.85 is "explained" by its best k, and the key set is the
  distinct best k of the explained neurons (Nanda et al.'s cut). Rows: key_freqs (how many),
  neurons_explained (fraction);
- restricted loss: cross-entropy on all n^2 inputs of sum_k P_k(L) plus the input-mean of L,
  P_k the projection of the logits L onto cos/sin(w_k (i + s j)), k in the key set;
  excluded loss: cross-entropy of L - sum_k P_k(L) on the training inputs (nats);
- gini_embed: Gini coefficient of the norms of F @ W_E[residues] (the embedding's residue
  rows in coordinate order); gini_neuron_logit: the same for W_U W_out (readout times the
  last MLP's output map; exact only up to the LayerNorm between them).
Other tasks and the MLP give no rows (with a warning).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from mdlgrok.complexity import payload
from mdlgrok.tasks import OPERATIONS, is_prime
from mdlgrok.training.objective import cross_entropy

# Version 1 throughout: for add the coordinates are the residues and the basis that of odd n, so
# its rows are what they were when the measure covered add alone.
NAME, VERSION, OPTIONS = "fourier", "1", json.dumps({"explained": 0.85})
EXPLAINED = 0.85  # share of a neuron's variance one frequency must hold (Nanda et al.)


def fourier_basis(n: int) -> torch.Tensor:
    """(n, n) orthonormal real Fourier basis, rows as above (float64): the estimator's Fourier rows."""
    return torch.from_numpy(payload.fourier_basis(n).copy())


def frequency_rows(n: int) -> list[list[int]]:
    """The basis rows of each frequency k = 1..n // 2: [cos, sin], or [cos] alone for k = n/2."""
    rows = [[2 * k - 1, 2 * k] for k in range(1, (n - 1) // 2 + 1)]
    return rows + [[n - 1]] if n % 2 == 0 else rows


@dataclass(frozen=True)
class CyclicCoordinates:
    """A task's operands as coordinates of Z_n: residues[i] is the residue at coordinate i, and
    the label of (residues[i], residues[j]) is residues[(i + sign * j) % n]."""

    n: int
    residues: torch.Tensor
    sign: int

    def coordinate_of(self, p: int) -> torch.Tensor:
        """(p,) the coordinate of each residue, -1 for one outside the group (0 in mul and div)."""
        out = torch.full((p,), -1, dtype=torch.int64)
        out[self.residues] = torch.arange(self.n)
        return out


def primitive_root(p: int) -> int:
    """The smallest generator of the multiplicative group mod a prime p."""
    factors = {q for q in range(2, p) if (p - 1) % q == 0 and is_prime(q)}
    return next(g for g in range(1, p) if all(pow(g, (p - 1) // q, p) != 1 for q in factors))


def coordinates(task: str, p: int) -> CyclicCoordinates | None:
    """The cyclic coordinates of a modular task, or None where it has none (other tasks, mul or div
    mod a composite, p < 3)."""
    sign = {"add": 1, "sub": -1, "mul": 1, "div": -1}.get(task)
    if sign is None or p < 3:
        return None
    if task in ("add", "sub"):
        return CyclicCoordinates(p, torch.arange(p), sign)
    if not is_prime(p):
        return None
    g = primitive_root(p)
    return CyclicCoordinates(p - 1, torch.tensor([pow(g, i, p) for i in range(p - 1)]), sign)


def gini(values: torch.Tensor) -> float:
    """Gini coefficient of non-negative values: 0 when all equal, (n-1)/n for one non-zero."""
    v = values.flatten().double().sort().values
    n, total = len(v), float(v.sum())
    if total == 0:
        return 0.0
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * i - n - 1) * v).sum() / (n * total))


def fourier_norms(rows: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Norms of the Fourier components of an (n, d) table indexed by coordinates: (n,)."""
    return (basis @ rows.double()).norm(dim=1)


def transform_2d(acts: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """coef[u, v, m] = sum_ij basis[u, i] basis[v, j] acts[i, j, m]: the 2-D Fourier transform per neuron,
    as two matrix products."""
    n, m = acts.shape[0], acts.shape[2]
    over_i = (basis @ acts.reshape(n, n * m)).reshape(n, n, m)  # [u, j, m]
    over_j = basis @ over_i.transpose(0, 1).reshape(n, n * m)  # [v, (u, m)]
    return over_j.reshape(n, n, m).transpose(0, 1)


def frequency_shares(acts: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """acts (n, n, m) over input coordinates (i, j) -> (K, m): each neuron's share of squared norm in
    frequency k's linear terms (i or j alone) and quadratic terms (i and j), after centering."""
    acts = acts.double() - acts.double().mean(dim=(0, 1))
    power = transform_2d(acts, basis).pow(2)
    total = power.sum(dim=(0, 1)).clamp_min(1e-30)
    shares = []
    for rows in frequency_rows(basis.shape[0]):
        linear = sum(power[r, 0] + power[0, r] for r in rows)
        quadratic = sum(power[r, q] for r in rows for q in rows)
        shares.append((linear + quadratic) / total)
    return torch.stack(shares)


def key_frequencies(acts: torch.Tensor, basis: torch.Tensor) -> tuple[list[int], float]:
    """The key set (distinct best k of the explained neurons) and the fraction explained."""
    shares = frequency_shares(acts, basis)
    best, k = shares.max(dim=0)
    explained = best >= EXPLAINED
    return sorted({int(x) + 1 for x in k[explained]}), float(explained.double().mean())


def sum_directions(n: int, basis: torch.Tensor, keys: list[int], sign: int = 1) -> torch.Tensor:
    """(d, n, n) orthonormal directions cos(w_k (i + sign j)), sin(w_k (i + sign j)) over the input grid
    (cos alone for k = n/2)."""
    out, rows = [], frequency_rows(n)
    for k in keys:
        if len(rows[k - 1]) == 1:  # k = n/2: cos(pi (i + j)) = c_i c_j, and no sine
            c = basis[rows[k - 1][0]]
            out.append(torch.outer(c, c))
            continue
        c, s = basis[rows[k - 1][0]], basis[rows[k - 1][1]]
        out.append((torch.outer(c, c) - sign * torch.outer(s, s)) / math.sqrt(2))  # cos(w(i + sign j))
        out.append((torch.outer(s, c) + sign * torch.outer(c, s)) / math.sqrt(2))  # sin(w(i + sign j))
    return torch.stack(out) if out else torch.zeros(0, n, n, dtype=torch.float64)


def restricted_excluded(logits: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, directions: torch.Tensor):
    """logits (n, n, V) over the input grid, labels (n, n), train (n, n) bool -> (restricted, excluded) losses, nats."""
    lg = logits.double()
    coef = torch.einsum("dab,abv->dv", directions, lg)
    key = torch.einsum("dv,dab->abv", coef, directions)
    restricted = key + lg.mean(dim=(0, 1))
    excluded = lg - key
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    r = float(cross_entropy(flat(restricted), labels.reshape(-1)))
    e = float(cross_entropy(flat(excluded)[train.reshape(-1)], labels.reshape(-1)[train.reshape(-1)]))
    return r, e


@torch.no_grad()
def last_mlp_and_logits(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last block's MLP activations (last position) and the logits, for tokens (N, 4)."""
    captured = {}
    block = model.blocks[-1]
    handle = block.fc1.register_forward_hook(lambda m, i, o: captured.__setitem__("pre", o))
    try:
        logits = model(tokens)
    finally:
        handle.remove()
    return F.gelu(captured["pre"][:, -1], approximate="tanh"), logits


def applicable(model, data) -> CyclicCoordinates | None:
    cfg = getattr(data, "config", None)
    if not hasattr(model, "blocks") or cfg is None:
        return None
    return coordinates(cfg.task, cfg.p)


def expected(cfg) -> set[tuple]:
    return {(NAME, VERSION, OPTIONS, None)}


@torch.no_grad()
def measure(model, data, cfg=None, payloads=None, epoch: int = 0) -> list[dict]:
    group = applicable(model, data)
    if group is None:
        warnings.warn(
            "the Fourier progress measures are defined for add, sub, mul and div (mul and div mod a prime) "
            "with the transformer; no fourier rows written",
            stacklevel=2,
        )
        return []
    p, n = data.config.p, group.n
    basis = fourier_basis(n)
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    a, b = group.residues[i], group.residues[j]
    tokens = torch.stack([a, torch.full_like(a, p), b, torch.full_like(a, p + 1)], dim=-1).reshape(-1, 4)
    acts, logits = last_mlp_and_logits(model, tokens)
    keys, explained = key_frequencies(acts.reshape(n, n, -1), basis)
    restricted, excluded = restricted_excluded(
        logits.reshape(n, n, -1),
        OPERATIONS[data.config.task][0](a, b, p),
        training_grid(data, group),
        sum_directions(n, basis, keys, group.sign),
    )
    neuron_logit = model.readout.weight @ model.blocks[-1].fc2.weight  # (vocab, d_mlp)
    values = {
        "key_freqs": len(keys),
        "neurons_explained": explained,
        "restricted_loss": restricted,
        "excluded_loss": excluded,
        "gini_embed": gini(fourier_norms(model.embed.weight[group.residues], basis)),
        "gini_neuron_logit": gini(fourier_norms(neuron_logit[group.residues], basis)),
    }
    return [
        {"metric": k, "value": float(v), "estimator": NAME, "estimator_version": VERSION, "options": OPTIONS}
        for k, v in values.items()
    ]


def training_grid(data, group: CyclicCoordinates) -> torch.Tensor:
    """(n, n) bool: which inputs of the coordinate grid are training examples."""
    coordinate = group.coordinate_of(data.config.p)
    i, j = coordinate[data.x_train[:, 0]], coordinate[data.x_train[:, 2]]
    inside = (i >= 0) & (j >= 0)
    grid = torch.zeros(group.n, group.n, dtype=torch.bool)
    grid[i[inside], j[inside]] = True
    return grid
