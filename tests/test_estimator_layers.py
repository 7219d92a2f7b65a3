"""The estimator on layers mdlgrok never builds: recurrent cells, 1-d, depthwise and transposed
convolutions, a bilinear map, torch's own transformer layer (packed attention projections) and a
bare parameter. Each payload decodes to weights whose loss is within eps, spends under 8 bits a
weight, and codes the unusual layer's tensors."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mdlgrok.complexity import decode, estimate

N, CLASSES = 96, 4


class Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.cell, self.out = cell(6, 12, batch_first=True), nn.Linear(12, CLASSES)

    def forward(self, x):
        return self.out(self.cell(x.reshape(len(x), 6, 6))[0][:, -1])


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.bilinear, self.out = nn.Bilinear(18, 18, 8), nn.Linear(8, CLASSES)

    def forward(self, x):
        return self.out(torch.relu(self.bilinear(x[:, :18], x[:, 18:])))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.out = nn.Linear(16, CLASSES)

    def forward(self, x):
        return self.out(self.layer(self.embed(x.reshape(len(x), 6, 6))).mean(1))


class Bare(nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.gain = nn.Parameter(0.1 * torch.randn(36, CLASSES)), nn.Parameter(torch.ones(CLASSES))

    def forward(self, x):
        return (x @ self.w) * self.gain


def image(x):
    return x.reshape(len(x), 1, 6, 6)


LAYERS = {
    "lstm": lambda: Recurrent(nn.LSTM),
    "gru": lambda: Recurrent(nn.GRU),
    "conv1d": lambda: nn.Sequential(
        nn.Unflatten(1, (6, 6)), nn.Conv1d(6, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, CLASSES)
    ),
    "depthwise": lambda: nn.Sequential(
        nn.Unflatten(1, (1, 6, 6)),
        nn.Conv2d(1, 4, 3, padding=1),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(144, CLASSES),
    ),
    "conv-transpose": lambda: nn.Sequential(
        nn.Unflatten(1, (1, 6, 6)),
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        nn.ConvTranspose2d(4, 2, 2, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(72, CLASSES),
    ),
    "bilinear": Pair,
    "transformer-layer": Encoder,
    "bare-parameter": Bare,
}


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 36, generator=g)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 0).long()) % CLASSES
    return x, y


# the tensors of each case's unusual layer: coded (dense or rank-k), not dropped, at a tight eps
CODED = {
    "lstm": ["cell.weight_ih_l0", "cell.weight_hh_l0"],
    "gru": ["cell.weight_ih_l0", "cell.weight_hh_l0"],
    "conv1d": ["1.weight"],
    "depthwise": ["2.weight"],
    "conv-transpose": ["2.weight"],
    "bilinear": ["bilinear.weight"],
    "transformer-layer": ["layer.self_attn.in_proj_weight", "layer.self_attn.out_proj.weight"],
    "bare-parameter": ["w"],
}
EPS = 0.1


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_any_layer_gets_an_honest_payload_shorter_than_its_weights(name, data):
    x, y = data
    torch.manual_seed(0)
    model = LAYERS[name]()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()

    def loss_fn(m):
        with torch.no_grad():
            return F.cross_entropy(m(x), y).item()

    base = loss_fn(model)
    (r,) = estimate(model, loss_fn, [EPS])
    coarse = copy.deepcopy(model)
    coarse.load_state_dict(decode(r.payload))
    assert loss_fn(coarse) == pytest.approx(r.coarse_loss, abs=1e-6)
    assert r.coarse_loss <= base + EPS
    assert r.bits < 8 * sum(p.numel() for p in model.parameters())  # under 8 bits a weight
    kinds = {c["name"]: c["kind"] for c in r.choices}
    assert all(kinds[n] in ("dense", "lowrank") for n in CODED[name]), kinds
