"""Nanda et al.'s progress measures (arXiv 2301.05217) for modular addition, on mdlgrok's
[a, OP, b, EQ] inputs and post-LayerNorm transformer.

Fourier basis F (p x p, p odd): row 0 = 1/sqrt(p); rows 2k-1, 2k = cos, sin(2 pi k x / p),
normalized, k = 1..(p-1)/2.
- key frequencies: for each neuron of the last block's MLP (last position, all p^2 inputs,
  centered), the share of its squared norm in frequency k's linear and quadratic 2-D Fourier
  terms; a neuron with a share >= 0.85 is "explained" by its best k, and the key set is the
  distinct best k of the explained neurons (Nanda et al.'s cut). Rows: key_freqs (how many),
  neurons_explained (fraction);
- restricted loss: cross-entropy on all p^2 inputs of sum_k P_k(L) plus the input-mean of L,
  P_k the projection of the logits L onto cos/sin(w_k (a + b)), k in the key set;
  excluded loss: cross-entropy of L - sum_k P_k(L) on the training inputs (nats);
- gini_embed: Gini coefficient of the norms of F @ W_E[:p] (the embedding's p residue rows);
  gini_neuron_logit: the same for W_U W_out (readout times the last MLP's output map, residue
  rows; exact only up to the LayerNorm between them).
Defined for add with the transformer; other tasks and the MLP give no rows (with a warning).
"""

from __future__ import annotations

import json
import math
import warnings

import torch
from torch.nn import functional as F

from mdlgrok.training.objective import cross_entropy

NAME, VERSION, OPTIONS = "fourier", "1", json.dumps({"explained": 0.85})
EXPLAINED = 0.85  # share of a neuron's variance one frequency must hold (Nanda et al.)


def fourier_basis(p: int) -> torch.Tensor:
    """(p, p) orthonormal real Fourier basis, rows as above (float64)."""
    x = torch.arange(p, dtype=torch.float64)
    rows = [torch.ones(p, dtype=torch.float64)]
    for k in range(1, (p - 1) // 2 + 1):
        rows += [torch.cos(2 * math.pi * k * x / p), torch.sin(2 * math.pi * k * x / p)]
    basis = torch.stack(rows)
    return basis / basis.norm(dim=1, keepdim=True)


def gini(values: torch.Tensor) -> float:
    """Gini coefficient of non-negative values: 0 when all equal, (n-1)/n for one non-zero."""
    v = values.flatten().double().sort().values
    n, total = len(v), float(v.sum())
    if total == 0:
        return 0.0
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * i - n - 1) * v).sum() / (n * total))


def fourier_norms(rows: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Norms of the Fourier components of a (p, d) table indexed by residues: (p,)."""
    return (basis @ rows.double()).norm(dim=1)


def transform_2d(acts: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """coef[i, j, n] = sum_ab basis[i, a] basis[j, b] acts[a, b, n]: the 2-D Fourier transform per neuron,
    as two matrix products."""
    p, n = acts.shape[0], acts.shape[2]
    over_a = (basis @ acts.reshape(p, p * n)).reshape(p, p, n)  # [i, b, n]
    over_b = basis @ over_a.transpose(0, 1).reshape(p, p * n)  # [j, (i, n)]
    return over_b.reshape(p, p, n).transpose(0, 1)


def frequency_shares(acts: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """acts (p, p, n) over inputs (a, b) -> (K, n): each neuron's share of squared norm in frequency
    k's linear terms (a or b alone) and quadratic terms (a and b), after centering."""
    acts = acts.double() - acts.double().mean(dim=(0, 1))
    coef = transform_2d(acts, basis)
    power = coef.pow(2)
    total = power.sum(dim=(0, 1)).clamp_min(1e-30)
    shares = []
    for k in range(1, (basis.shape[0] - 1) // 2 + 1):
        c, s = 2 * k - 1, 2 * k
        linear = power[c, 0] + power[s, 0] + power[0, c] + power[0, s]
        quadratic = power[c, c] + power[c, s] + power[s, c] + power[s, s]
        shares.append((linear + quadratic) / total)
    return torch.stack(shares)


def key_frequencies(acts: torch.Tensor, basis: torch.Tensor) -> tuple[list[int], float]:
    """The key set (distinct best k of the explained neurons) and the fraction explained."""
    shares = frequency_shares(acts, basis)
    best, k = shares.max(dim=0)
    explained = best >= EXPLAINED
    return sorted({int(x) + 1 for x in k[explained]}), float(explained.double().mean())


def sum_directions(p: int, basis: torch.Tensor, keys: list[int]) -> torch.Tensor:
    """(2 |keys|, p, p) orthonormal directions cos(w_k (a + b)), sin(w_k (a + b)) over the input grid."""
    out = []
    for k in keys:
        c, s = basis[2 * k - 1], basis[2 * k]
        out.append((torch.outer(c, c) - torch.outer(s, s)) / math.sqrt(2))  # cos(w(a+b)) normalized
        out.append((torch.outer(s, c) + torch.outer(c, s)) / math.sqrt(2))  # sin(w(a+b)) normalized
    return torch.stack(out) if out else torch.zeros(0, p, p, dtype=torch.float64)


def restricted_excluded(logits: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, directions: torch.Tensor):
    """logits (p, p, V) over all inputs, labels (p, p), train (p, p) bool -> (restricted, excluded) losses, nats."""
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


def applicable(model, data) -> bool:
    cfg = getattr(data, "config", None)
    return getattr(cfg, "task", None) == "add" and hasattr(model, "blocks") and cfg.p % 2 == 1


def expected(cfg) -> set[tuple]:
    return {(NAME, VERSION, OPTIONS, None)}


@torch.no_grad()
def measure(model, data, cfg=None, payloads=None, epoch: int = 0) -> list[dict]:
    if not applicable(model, data):
        warnings.warn(
            "the Fourier progress measures are defined for add mod an odd p with the transformer; "
            "no fourier rows written",
            stacklevel=2,
        )
        return []
    p = data.config.p
    basis = fourier_basis(p)
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    tokens = torch.stack([a, torch.full_like(a, p), b, torch.full_like(a, p + 1)], dim=-1).reshape(-1, 4)
    acts, logits = last_mlp_and_logits(model, tokens)
    keys, explained = key_frequencies(acts.reshape(p, p, -1), basis)
    train = torch.zeros(p * p, dtype=torch.bool)
    train[data.x_train[:, 0] * p + data.x_train[:, 2]] = True
    labels = (a + b) % p
    restricted, excluded = restricted_excluded(
        logits.reshape(p, p, -1), labels, train.reshape(p, p), sum_directions(p, basis, keys)
    )
    neuron_logit = model.readout.weight @ model.blocks[-1].fc2.weight  # (vocab, d_mlp)
    values = {
        "key_freqs": len(keys),
        "neurons_explained": explained,
        "restricted_loss": restricted,
        "excluded_loss": excluded,
        "gini_embed": gini(fourier_norms(model.embed.weight[:p], basis)),
        "gini_neuron_logit": gini(fourier_norms(neuron_logit[:p], basis)),
    }
    return [
        {"metric": k, "value": float(v), "estimator": NAME, "estimator_version": VERSION, "options": OPTIONS}
        for k, v in values.items()
    ]
