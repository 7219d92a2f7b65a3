"""Input second moments of linear maps, read off one call of the loss closure."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mdlgrok.complexity import estimate
from mdlgrok.complexity.moments import DAMPING, input_moments


class TwoWays(nn.Module):
    """fc is applied by nn.Linear; mat by x @ mat.T (not F.linear); table is looked up and also
    used as a readout through F.linear (read two ways)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(5, 4)
        self.fc = nn.Linear(4, 4)
        self.mat = nn.Parameter(torch.randn(4, 4))

    def forward(self, tokens):
        x = self.fc(self.table(tokens))
        x = x @ self.mat.T
        return F.linear(x, self.table.weight)


def expected(x: torch.Tensor) -> np.ndarray:
    x = x.detach().double().reshape(-1, x.shape[-1])
    h = (x.T @ x / len(x)).numpy()
    h = h / (np.trace(h) / len(h)) + DAMPING * np.eye(len(h))
    return h / (1 + DAMPING)


def test_moments_of_linear_layers_are_their_inputs_second_moment():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    x = torch.randn(40, 3) * torch.tensor([1.0, 3.0, 0.1])
    moments = input_moments(lambda m: float(m(x).sum()), model, model.state_dict())
    assert set(moments) == {"0.weight", "2.weight"}
    np.testing.assert_allclose(moments["0.weight"], expected(x), rtol=1e-10)
    np.testing.assert_allclose(moments["2.weight"], expected(torch.tanh(model[0](x))), rtol=1e-6)
    assert all(np.isclose(np.trace(h) / len(h), 1.0) for h in moments.values())


def test_inputs_of_several_calls_are_pooled():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    a, b = torch.randn(10, 3), torch.randn(30, 3) * 2

    def loss_fn(m):  # a closure that evaluates in two batches
        return float(m(a).sum() + m(b).sum())

    moments = input_moments(loss_fn, model, model.state_dict())
    np.testing.assert_allclose(moments["weight"], expected(torch.cat([a, b])), rtol=1e-10)


def test_weights_read_other_ways_get_no_moments():
    torch.manual_seed(0)
    model = TwoWays()
    tokens = torch.randint(0, 5, (20,))
    moments = input_moments(lambda m: float(m(tokens).sum()), model, model.state_dict())
    assert set(moments) == {"fc.weight"}  # table: also looked up; mat: read by matmul


def test_a_closure_that_fails_under_the_recorder_raises_and_estimate_records_plain_norms():
    model = nn.Linear(3, 2)
    x = torch.randn(16, 3)

    def loss_fn(m):
        if torch._C._is_torch_function_mode_enabled():  # fails only under the recorder
            raise RuntimeError("no")
        with torch.no_grad():
            return float(m(x).pow(2).mean())

    with pytest.raises(RuntimeError):
        input_moments(lambda m: (_ for _ in ()).throw(RuntimeError("no")), model, model.state_dict())
    with pytest.warns(UserWarning, match="input moments could not be read"):
        results = estimate(model, loss_fn, [1.0])
    assert results[0].norms.startswith("frobenius (input moments unreadable: RuntimeError")


def test_unused_linear_layers_and_zero_inputs_get_no_moments():
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)})
    moments = input_moments(lambda m: float(m["used"](torch.zeros(4, 3)).sum()), model, model.state_dict())
    assert moments == {}
