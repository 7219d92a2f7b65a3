"""Regularizers that lower the network's information capacity, ~ N_eff * log2(range / precision).

- weight decay bounds the range (applied by AdamW in train.py);
- the spectral-entropy penalty lowers the effective number of parameters N_eff;
- quantization noise lowers the precision the loss can depend on.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

PRESETS = ("none", "wd", "ours")


@dataclass
class RegConfig:
    wd: float = 0.0  # AdamW weight decay on all parameters
    gamma: float = 0.0  # weight of the mean spectral entropy (nats) of all weight matrices
    sigma: float = 0.0  # noise scale: Gaussian std, or the bin width delta for uniform noise
    noise: str = "gaussian"  # "gaussian" (the paper) or "uniform" in [-sigma/2, sigma/2]

    def __post_init__(self):
        for name in ("wd", "gamma", "sigma"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.noise not in ("gaussian", "uniform"):
            raise ValueError(f"unknown noise {self.noise!r}; choose gaussian or uniform")


def preset(name: str, task: str) -> RegConfig:
    """The paper's presets: none, wd (1.0), ours (wd 1.0, gamma 0.1, sigma 1e-2 add/mul else 1e-3)."""
    if name == "none":
        return RegConfig()
    if name == "wd":
        return RegConfig(wd=1.0)
    if name == "ours":
        return RegConfig(wd=1.0, gamma=0.1, sigma=1e-2 if task in ("add", "mul") else 1e-3)
    raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")


def weight_matrices(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter with two or more dimensions (embeddings included), as a 2-D matrix."""
    return [p.reshape(p.shape[0], -1) for p in model.parameters() if p.ndim >= 2]


def singular_values(matrices: list[torch.Tensor]) -> list[torch.Tensor]:
    """Singular values of each matrix (..., m, n), from the eigenvalues of its smaller Gram matrix.

    s_i = sqrt(eig_i(W^T W)) (or W W^T, whichever is smaller). Matrices whose Gram matrices
    share a size are stacked into one batched ``eigvalsh``, far cheaper than one SVD each;
    leading dimensions (stacked models) are batched too. Gradients flow through the
    eigenvalues only.
    """
    groups: dict[int, list[int]] = defaultdict(list)
    grams = []
    for i, w in enumerate(matrices):
        # float64: the Gram squares the condition number, and in float32 its rounding would put a
        # floor of ~3e-4 * s_max under the small singular values that the penalty pushes down.
        w = w.double()
        gram = w.mT @ w if w.shape[-2] >= w.shape[-1] else w @ w.mT
        grams.append(gram)
        groups[gram.shape[-1]].append(i)
    out: list[torch.Tensor] = [None] * len(matrices)  # type: ignore[list-item]
    for idx in groups.values():
        stacked = torch.stack([grams[i] for i in idx])
        # Non-finite weights (a diverged run) give NaN singular values, so that the loss turns
        # NaN and the run is stopped cleanly, instead of eigvalsh raising a LinAlgError.
        finite = torch.isfinite(stacked).all(dim=(-2, -1), keepdim=True)
        eig = torch.linalg.eigvalsh(torch.where(finite, stacked, 0.0)).masked_fill(~finite[..., 0], float("nan"))
        s = eig.clamp_min(0).add(1e-30).sqrt().to(matrices[0].dtype)
        for row, i in enumerate(idx):
            out[i] = s[row].flip(-1)  # descending, like svdvals
    return out


def spectral_entropy(s: torch.Tensor) -> torch.Tensor:
    """H(W) = -sum_i p_i ln p_i with p_i = s_i / sum(s) (nats), over the last dimension;
    effective rank is exp(H)."""
    p = s / s.sum(-1, keepdim=True)
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def mean_spectral_entropy(model: nn.Module) -> torch.Tensor:
    """Mean over all weight matrices of H(W), in nats: the paper's penalty before gamma."""
    return torch.stack([spectral_entropy(s) for s in singular_values(weight_matrices(model))]).mean()


@torch.no_grad()
def effective_ranks(model: nn.Module) -> list[float]:
    """exp(H(W)) of every weight matrix, computed with exact SVDs."""
    return [float(spectral_entropy(torch.linalg.svdvals(w)).exp()) for w in weight_matrices(model)]


class WeightNoise:
    """Quantization noise: the loss and its gradient are taken at theta + noise, the update
    applies to the clean theta. "gaussian": noise ~ N(0, sigma^2) (sigma is a std; the
    paper's code calls it "variance"). "uniform": noise ~ U[-sigma/2, sigma/2], the exact
    error of a quantizer with bin sigma."""

    def __init__(self, params: list[nn.Parameter], sigma: float, kind: str, generator: torch.Generator):
        self.params, self.sigma, self.kind, self.generator = params, sigma, kind, generator
        self.clean: list[torch.Tensor] = []

    @torch.no_grad()
    def add(self) -> None:
        self.clean = [p.detach().clone() for p in self.params]
        for p in self.params:
            if self.kind == "gaussian":
                noise = torch.randn(p.shape, generator=self.generator, dtype=p.dtype) * self.sigma
            else:
                noise = (torch.rand(p.shape, generator=self.generator, dtype=p.dtype) - 0.5) * self.sigma
            p.add_(noise.to(p.device))

    @torch.no_grad()
    def remove(self) -> None:
        for p, c in zip(self.params, self.clean):
            p.copy_(c)
        self.clean = []
