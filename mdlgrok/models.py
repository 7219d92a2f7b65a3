"""The paper's Transformer and MLP, initialized as its Flax code.

Attention comes in two forms. ``attention="paper"`` reproduces the paper's code, whose
``einsum('bhqk,bhvd->bhqd', weights, values)`` sums over k and v separately: softmax rows
sum to 1, so every position receives the plain sum of the value vectors and the query and
key projections get no gradient (they only decay). ``attention="softmax"`` is standard
scaled dot-product attention.

``model="dense"`` is a plain ReLU MLP on feature vectors (the digits task): Omnigrok's
64-200-200-10 network (Liu et al. 2023), every parameter multiplied by ``init_scale`` (their
alpha) after torch's default initialization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

SEQ_LEN = 4  # [a, OP, b, EQ]
MODELS = ("transformer", "mlp", "dense")


@dataclass
class ModelConfig:
    vocab: int = 115  # p + 2 tokens (p = 113)
    model: str = "transformer"  # "transformer", "mlp" (on tokens) or "dense" (on feature vectors)
    layers: int = 1  # transformer blocks (paper: 1 for add/mul, 2 for sub/div)
    d_model: int = 128  # paper's width
    heads: int = 4  # 4 heads of 32
    d_mlp: int = 512  # paper's MLP width
    attention: str = "paper"  # "paper" (sum of values, as the paper ran) or "softmax"
    pos_rows: int | None = None  # positional table rows; None -> vocab (the paper's), 4 is enough
    inputs: int = 64  # dense: input features
    classes: int = 10  # dense: outputs
    width: int = 200  # dense: hidden width (layers hidden layers)
    init_scale: float = 1.0  # every parameter multiplied by it at initialization (Omnigrok's alpha)

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose from {', '.join(MODELS)}")
        if self.width < 1:
            raise ValueError(f"width must be a positive hidden width, got {self.width}")
        if not 0 < self.init_scale < math.inf:
            raise ValueError(f"init_scale must be a positive finite number, got {self.init_scale}")
        if self.attention not in ("paper", "softmax"):
            raise ValueError(f"unknown attention {self.attention!r}; choose paper or softmax")
        if self.layers < 1:
            raise ValueError(f"layers must be at least 1, got {self.layers}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by heads {self.heads}")
        if self.pos_rows is None:
            self.pos_rows = self.vocab
        if self.pos_rows < SEQ_LEN:
            raise ValueError(f"positional table needs at least {SEQ_LEN} rows, got {self.pos_rows}")


def lecun_linear(d_in: int, d_out: int) -> nn.Linear:
    """Linear layer with Flax's lecun_normal init: truncated normal (+-2 std), variance 1/fan_in."""
    layer = nn.Linear(d_in, d_out)
    std = math.sqrt(1.0 / d_in) / 0.87962566103423978  # std of a unit normal truncated at +-2
    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(layer.bias)
    return layer


def embedding(rows: int, d: int) -> nn.Embedding:
    """Embedding table initialized N(0, 1/d) (variance), as Flax's default embed init."""
    emb = nn.Embedding(rows, d)
    nn.init.normal_(emb.weight, std=math.sqrt(1.0 / d))
    return emb


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.heads, self.mode = cfg.heads, cfg.attention
        self.q, self.k, self.v, self.o = (lecun_linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """x (B, T, d) -> (B, T', d); T' = 1 when only the last position is needed."""
        b, t, d = x.shape
        split = lambda z: z.view(b, -1, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        v = split(self.v(x))
        if self.mode == "paper":
            # einsum('bhqk,bhvd->bhqd'): softmax weights sum to 1 over k, leaving sum_v values.
            out = v.sum(dim=2, keepdim=True).expand(-1, -1, 1 if last_only else t, -1)
        else:
            q = split(self.q(x[:, -1:] if last_only else x))
            out = F.scaled_dot_product_attention(q, split(self.k(x)), v)
        return self.o(out.transpose(1, 2).reshape(b, -1, d))


class Block(nn.Module):
    """Post-LayerNorm block: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=1e-6)
        self.fc1 = lecun_linear(cfg.d_model, cfg.d_mlp)
        self.fc2 = lecun_linear(cfg.d_mlp, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=1e-6)

    def forward(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        residual = x[:, -1:] if last_only else x
        x = self.ln1(residual + self.attn(x, last_only))
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = embedding(cfg.vocab, cfg.d_model)
        self.pos = embedding(cfg.pos_rows, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.readout = lecun_linear(cfg.d_model, cfg.vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, 4) -> logits (B, vocab) read off the last position."""
        x = self.embed(tokens) + self.pos.weight[: tokens.shape[1]]
        for i, block in enumerate(self.blocks):
            # Only the last position is read out, so the last block computes just that one.
            x = block(x, last_only=i == len(self.blocks) - 1)
        return self.readout(x[:, -1])


class MLP(nn.Module):
    """The 4 token embeddings concatenated, three 512-wide ReLU layers, readout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = embedding(cfg.vocab, cfg.d_model)
        width = SEQ_LEN * cfg.d_model
        self.hidden = nn.ModuleList(lecun_linear(width if i == 0 else cfg.d_mlp, cfg.d_mlp) for i in range(3))
        self.readout = lecun_linear(cfg.d_mlp, cfg.vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens).flatten(1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.readout(x)


class DenseMLP(nn.Module):
    """inputs -> `layers` ReLU layers of `width` -> classes, torch's default Linear init."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        sizes = [cfg.inputs] + [cfg.width] * cfg.layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.readout = nn.Linear(sizes[-1], cfg.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.readout(x)


def build_model(cfg: ModelConfig) -> nn.Module:
    model = {"transformer": Transformer, "mlp": MLP, "dense": DenseMLP}[cfg.model](cfg)
    if cfg.init_scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(cfg.init_scale)
    return model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
