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


def weight_matrices(params, batch_dims: int = 0) -> list[torch.Tensor]:
    """Every parameter with two or more dimensions (embeddings included), as a 2-D matrix; `params`
    is a module or an iterable of tensors, whose first `batch_dims` axes (stacked models) are kept."""
    params = params.parameters() if isinstance(params, nn.Module) else params
    return [p.reshape(*p.shape[: batch_dims + 1], -1) for p in params if p.ndim >= 2 + batch_dims]


class _GramSingularValues(torch.autograd.Function):
    """Singular values of matrices whose smaller Gram matrices share one size, with the gradient
    of the SVD; called as apply(tall_flags, *matrices).

    Forward: s_i = sqrt(eig_i(G)) with G = W^T W (tall W) or W W^T, in float64: the Gram squares
    the condition number, and in float32 its rounding would put a floor of ~3e-4 * s_max under
    the small singular values that the penalty pushes down. All the Grams go through one batched
    ``eigh``, whatever the shapes of the matrices they come from.
    Backward: "gradients through singular values only", dL/dW = U diag(dL/ds) V^T, and with
    U S = W V (tall W) that is W V diag(g / s) V^T: one eigendecomposition serves both passes,
    and no eigenvector derivative or Gram backward is formed.
    """

    @staticmethod
    def forward(ctx, tall: tuple[bool, ...], *ws: torch.Tensor) -> tuple[torch.Tensor, ...]:
        wds = [w.double() for w in ws]
        gram = torch.stack([wd.mT @ wd if t else wd @ wd.mT for wd, t in zip(wds, tall)])
        # Non-finite weights (a diverged run) give NaN singular values, so that the loss turns
        # NaN and the run is stopped cleanly, instead of eigh raising a LinAlgError.
        finite = torch.isfinite(gram).all(dim=(-2, -1), keepdim=True)
        eig, vecs = torch.linalg.eigh(torch.where(finite, gram, 0.0))
        s = eig.masked_fill(~finite[..., 0], float("nan")).clamp_min(0).add(1e-30).sqrt()
        ctx.save_for_backward(vecs, s, *wds)
        ctx.tall = tall
        return tuple(s[k].flip(-1).to(w.dtype) for k, w in enumerate(ws))  # descending, like svdvals

    @staticmethod
    def backward(ctx, *grad_s: torch.Tensor):
        vecs, s, *wds = ctx.saved_tensors
        grads = []
        for k, (wd, tall, g) in enumerate(zip(wds, ctx.tall, grad_s)):
            scale, v = g.flip(-1).double() / s[k], vecs[k]
            if tall:  # W V = U S
                grad = ((wd @ v) * scale[..., None, :]) @ v.mT
            else:  # V^T W = S U^T with V the eigenvectors of W W^T (the left singular vectors)
                grad = v @ (scale[..., :, None] * (v.mT @ wd))
            grads.append(grad.to(g.dtype))
        return (None, *grads)


def singular_values(matrices: list[torch.Tensor]) -> list[torch.Tensor]:
    """Singular values of each matrix (..., m, n), descending, from its smaller Gram matrix.

    Matrices whose Gram matrices share a size (and leading dimensions: stacked models) go through
    one batched ``eigh``, far cheaper than one SVD each. Gradients flow through the singular
    values only.
    """
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, w in enumerate(matrices):
        groups[(*w.shape[:-2], min(w.shape[-2:]))].append(i)
    out: list[torch.Tensor] = [None] * len(matrices)  # type: ignore[list-item]
    for idx in groups.values():
        ws = [matrices[i] for i in idx]
        tall = tuple(w.shape[-2] >= w.shape[-1] for w in ws)
        for i, s in zip(idx, _GramSingularValues.apply(tall, *ws)):
            out[i] = s
    return out


def spectral_entropy(s: torch.Tensor) -> torch.Tensor:
    """H(W) = -sum_i p_i ln p_i with p_i = s_i / sum(s) (nats), over the last dimension;
    effective rank is exp(H)."""
    p = s / s.sum(-1, keepdim=True)
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def mean_spectral_entropy(params, batch_dims: int = 0) -> torch.Tensor:
    """Mean over all weight matrices of H(W), in nats: the paper's penalty before gamma.
    A module or tensors; with batch_dims=1 (stacked models) one value per model."""
    mats = weight_matrices(params, batch_dims)
    return torch.stack([spectral_entropy(s) for s in singular_values(mats)], dim=-1).mean(-1)


@torch.no_grad()
def effective_ranks(params, batch_dims: int = 0) -> list[torch.Tensor]:
    """exp(H(W)) of every weight matrix, computed with exact SVDs (non-finite weights count as 0)."""
    mats = [torch.where(w.isfinite(), w, 0.0) for w in weight_matrices(params, batch_dims)]
    return [spectral_entropy(torch.linalg.svdvals(w)).exp() for w in mats]


def draw_noise(
    shape,
    sigma: float,
    kind: str,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Quantization noise of one tensor: N(0, sigma^2) ("gaussian": sigma is a std; the paper's
    code calls it "variance"), or U[-sigma/2, sigma/2] ("uniform": the exact error of a quantizer
    with bin sigma)."""
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, dtype=dtype, device=device) * sigma
    return (torch.rand(shape, generator=generator, dtype=dtype, device=device) - 0.5) * sigma


class WeightNoise:
    """Quantization noise: the loss and its gradient are taken at theta + noise (draw_noise),
    the update applies to the clean theta."""

    def __init__(self, params: list[nn.Parameter], sigma: float, kind: str, generator: torch.Generator):
        self.params, self.sigma, self.kind, self.generator = params, sigma, kind, generator
        self.clean: list[torch.Tensor] = []

    @torch.no_grad()
    def add(self) -> None:
        self.clean = [p.detach().clone() for p in self.params]
        for p in self.params:
            p.add_(draw_noise(p.shape, self.sigma, self.kind, self.generator, p.dtype).to(p.device))

    @torch.no_grad()
    def remove(self) -> None:
        for p, c in zip(self.params, self.clean):
            p.copy_(c)
        self.clean = []


class EmaGradFilter:
    """Grokfast's EMA gradient filter (Lee et al. 2024, arXiv 2405.20233), applied to the gradients
    between backward and the optimizer step:

        mu <- alpha mu + (1 - alpha) g      (mu starts at the first gradient)
        g  <- g + lambda mu

    Its code's defaults are alpha 0.98, lambda 2.0 (its README suggests 0.99 and 5.0). alpha and
    lambda are numbers, or per-model tensors that broadcast against stacked gradients (lambda 0:
    no filter for that model)."""

    def __init__(self, alpha, lamb):
        self.alpha, self.lamb = alpha, lamb
        self.mu: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def __call__(self, grads: dict[str, torch.Tensor]) -> None:
        """Filter the gradients in place."""
        if self.mu is None:
            self.mu = {k: g.detach().clone() for k, g in grads.items()}
        else:
            for k, g in grads.items():
                alpha = _broadcast(self.alpha, g)
                self.mu[k].mul_(alpha).add_(g * (1 - alpha))
        for k, g in grads.items():
            g.add_(self.mu[k] * _broadcast(self.lamb, g))


def _broadcast(x, like: torch.Tensor):
    """A number, or a per-model (N,) tensor shaped to broadcast against a stacked (N, ...) tensor."""
    return x.view(-1, *([1] * (like.ndim - 1))) if isinstance(x, torch.Tensor) else x
