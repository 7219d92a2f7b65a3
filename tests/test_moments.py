"""Input second moments of linear maps, read off one call of the loss closure."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mdlgrok.complexity import decode, estimate
from mdlgrok.complexity.coarse import dense_entry, lowrank_entry, split_rows, targets_of
from mdlgrok.complexity.moments import DAMPING, RowMoments, RowReads, input_moments
from mdlgrok.complexity.payload import entry_tensor
from mdlgrok.models import ModelConfig, build_model
from mdlgrok.tasks import TaskConfig, make_dataset


class TwoWays(nn.Module):
    """fc is applied by nn.Linear; mat by x @ mat.T and also sliced (read two ways); table is
    looked up and also used as a readout through F.linear (read two ways)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(5, 4)
        self.fc = nn.Linear(4, 4)
        self.mat = nn.Parameter(torch.randn(4, 4))

    def forward(self, tokens):
        x = self.fc(self.table(tokens))
        x = x @ self.mat.T + self.mat[0]
        return F.linear(x, self.table.weight)


class Kernels(nn.Module):
    """The layouts of hand-written layers: a kernel (inputs x outputs) applied as x @ k (JAX and
    Flax), torch.matmul(x, k2), and torch-layout weights applied as x @ w.T and F.linear(x, v.t().t()).
    Reading a weight's dtype or shape is no read of its values."""

    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.randn(3, 5))
        self.k2 = nn.Parameter(torch.randn(5, 4))
        self.w = nn.Parameter(torch.randn(6, 4))
        self.v = nn.Parameter(torch.randn(2, 6))

    def forward(self, x):
        h = torch.tanh(x.to(self.k.dtype) @ self.k)
        h = torch.matmul(input=h[..., : self.k2.shape[0]], other=self.k2)
        h = h @ self.w.T
        return F.linear(h, self.v.t().t())


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
    assert set(moments) == {"fc.weight"}  # table: also looked up; mat: also sliced


class Tokens(nn.Module):
    """A table looked up by nn.Embedding, in two calls, and a readout."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(52, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, tokens):
        return self.out(self.table(tokens[:, :2]).sum(1) + self.table(tokens[:, 2]))


def sums_and_operator(n: int = 40) -> torch.Tensor:
    """Rows (a, b, op): a and b among 50 residues, op token 50 in every example (token 51 unused)."""
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.randint(0, 50, (n, 2), generator=g), torch.full((n, 1), 50)], 1)


def test_a_table_read_only_by_lookups_gets_the_count_of_each_rows_reads():
    torch.manual_seed(0)
    model, tokens = Tokens(), sums_and_operator()
    moments = input_moments(lambda m: float(m(tokens).sum()), model, model.state_dict())
    assert set(moments) == {"table.weight", "out.weight"}
    reads = moments["table.weight"]
    assert isinstance(reads, RowReads) and reads.counts.shape == (52,)
    np.testing.assert_array_equal(reads.counts, np.bincount(tokens.reshape(-1), minlength=52))  # both calls
    model = TwoWays()  # a table also read another way: no counts
    moments = input_moments(lambda m: float(m(torch.randint(0, 5, (20,))).sum()), model, model.state_dict())
    assert "table.weight" not in moments


class Indexed(nn.Module):
    """Tables read as W[tokens - 6] (negative indices), W.index_select(0, tokens), and W[tokens] with a
    slice of W (another read)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Parameter(torch.randn(6, 4)) for _ in range(3))

    def forward(self, tokens):
        return self.a[tokens - 6] + self.b.index_select(0, tokens) + self.c[tokens] + self.c[:1]


def test_tables_indexed_by_integer_tensors_get_the_count_of_each_rows_reads():
    model, tokens = Indexed(), torch.tensor([0, 3, 3, 5])
    moments = input_moments(lambda m: float(m(tokens).sum()), model, model.state_dict())
    assert set(moments) == {"a", "b"}  # c: also sliced
    for name in ("a", "b"):
        np.testing.assert_array_equal(moments[name].counts, [1, 0, 0, 2, 0, 1])  # a: negative indices


def test_the_rows_a_table_reads_most_are_split_off_by_their_reads():
    """Rows looked up HEAVY_READS (8) times as often as the median row or more, and in at least
    HEAVY_SHARE (1%) of the lookups, are a block of their own (an unread row stays in the other
    block)."""
    w = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    (t,) = targets_of({"table": w}, moments={"table": RowReads(np.array([8] * 10 + [80, 0]))})
    assert t.h is None and t.reads is not None
    block, apart = split_rows([t])
    assert (block.rows, apart.rows, apart.part) == (tuple(range(10)) + (11,), (10,), True)
    for reads in (
        [8] * 10 + [40, 0],  # 5x the median: read as most rows are
        [1] * 1000 + [8] + [0] * 11,  # 8x the median, but in under 1% of the lookups (a sparsely read table)
    ):
        (t,) = targets_of({"table": torch.randn(len(reads), 8)}, moments={"table": RowReads(np.array(reads))})
        assert split_rows([t]) == [t]


def test_estimate_codes_the_rows_a_table_reads_most_as_a_block_of_their_own():
    torch.manual_seed(0)
    model, tokens = Tokens(), sums_and_operator(200)
    y = tokens[:, :2].sum(1) % 3
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(tokens), y).backward()
        opt.step()

    def loss_fn(m):
        with torch.no_grad():
            return float(F.cross_entropy(m(tokens), y))

    (r,) = estimate(model, loss_fn, [0.01])
    blocks = [c for c in r.choices if c["name"] == "table.weight"]
    assert len(blocks) == 2 and blocks[1]["kind"] in ("zero", "dense") and blocks[1]["rows"] in (None, 1)
    assert blocks[0]["kind"] == "zero" or blocks[0]["rows"] == 50  # the residues (51, never read, is zero)
    probe = copy.deepcopy(model)
    probe.load_state_dict(decode(r.payload))
    assert loss_fn(probe) == r.coarse_loss <= r.base_loss + 0.01


def test_kernels_read_as_x_at_k_get_moments_over_their_rows():
    torch.manual_seed(0)
    model = Kernels()
    x = torch.randn(30, 3) * torch.tensor([1.0, 2.0, 0.5])
    moments = input_moments(lambda m: float(m(x).sum()), model, model.state_dict())
    assert set(moments) == {"k", "k2", "w", "v"}
    assert isinstance(moments["k"], RowMoments) and isinstance(moments["k2"], RowMoments)
    np.testing.assert_allclose(moments["k"].h, expected(x), rtol=1e-10)
    np.testing.assert_allclose(moments["k2"].h, expected(torch.tanh(x @ model.k)), rtol=1e-6)
    h2 = torch.tanh(x @ model.k) @ model.k2
    np.testing.assert_allclose(moments["w"], expected(h2), rtol=1e-6)  # x @ w.T: over w's columns
    np.testing.assert_allclose(moments["v"], expected(h2 @ model.w.T), rtol=1e-6)  # v.t().t() is v


class Einsums(nn.Module):
    """Linear maps written as einsum, as JAX ports do: a kernel over the last axis, a torch-layout
    weight, the list form with an ellipsis; and two that are not linear maps of one axis (kept
    in plain norms)."""

    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.randn(3, 5))
        self.w = nn.Parameter(torch.randn(4, 5))
        self.u = nn.Parameter(torch.randn(4, 4))
        self.diag = nn.Parameter(torch.randn(4, 4))
        self.both = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):  # x: (batch, time, 3)
        h = torch.tanh(torch.einsum("btd,df->btf", x, self.k))
        h = torch.einsum("of,btf->bto", self.w, h)
        h = torch.einsum("...f,fo->...o", [h, self.u])
        h = h + torch.einsum("ff,btf->btf", self.diag, h)  # a repeated index: not a linear map
        return torch.einsum("bti,ij,btj->bt", h, self.both, h)  # three operands: not tracked


def test_einsum_linear_maps_get_moments_on_the_contracted_side():
    torch.manual_seed(0)
    model = Einsums()
    x = torch.randn(10, 4, 3) * torch.tensor([1.0, 2.0, 0.5])
    moments = input_moments(lambda m: float(m(x).sum()), model, model.state_dict())
    assert set(moments) == {"k", "w", "u"}
    assert isinstance(moments["k"], RowMoments) and isinstance(moments["u"], RowMoments)
    np.testing.assert_allclose(moments["k"].h, expected(x), rtol=1e-10)
    h = torch.tanh(x @ model.k)
    np.testing.assert_allclose(moments["w"], expected(h), rtol=1e-6)  # "of,btf": over w's columns
    np.testing.assert_allclose(moments["u"].h, expected(h @ model.w.T), rtol=1e-6)


class Views(nn.Module):
    """enc and dec share storage (dec is enc's transpose); a.transpose(0, 1) flips a's side;
    F.linear with its keywords in any order; a product of two weights reads neither as a map."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Parameter(torch.randn(4, 4))
        self.dec = nn.Parameter(self.enc.data.T)
        self.a = nn.Parameter(torch.randn(4, 4))
        self.b = nn.Parameter(torch.randn(4, 4))
        self.c = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        h = F.linear(x, self.enc.T)  # the same tensor as dec: x meets dec's columns
        h = F.linear(weight=self.a.transpose(0, 1), input=torch.tanh(h))  # x meets a's rows
        return h @ (self.b @ self.c)


def test_views_and_keywords_of_linear_calls_put_h_on_the_side_the_inputs_meet():
    torch.manual_seed(0)
    model = Views()
    x = torch.randn(20, 4)
    moments = input_moments(lambda m: float(m(x).sum()), model, model.state_dict())
    assert set(moments) == {"dec", "a"}  # enc is dec's storage; b and c: only multiplied together
    np.testing.assert_allclose(moments["dec"], expected(x), rtol=1e-10)
    np.testing.assert_allclose(moments["a"].h, expected(torch.tanh(x @ model.dec.T)), rtol=1e-6)


def test_a_weight_passed_in_a_list_counts_as_read_another_way():
    model = nn.Linear(3, 3)

    def loss_fn(m):
        return float(m(torch.ones(2, 3)).sum() + torch.cat([m.weight, m.weight]).sum())

    assert input_moments(loss_fn, model, model.state_dict()) == {}


def test_a_kernel_is_coded_transposed_and_decodes_in_its_own_layout():
    """x @ k is F.linear(x, k^T): the target codes k^T with k's rows as its inputs, and every
    entry decodes to a tensor of k's shape; the search stays honest."""
    torch.manual_seed(0)
    model = Kernels()
    x = torch.randn(64, 3)
    y = torch.randint(0, 2, (64,))

    def loss_fn(m):
        with torch.no_grad():
            return float(F.cross_entropy(m(x), y))

    moments = input_moments(loss_fn, model, model.state_dict())
    t = {t.name: t for t in targets_of(model.state_dict(), moments=moments)}
    assert t["k"].transposed and t["k"].coded_shape == (5, 3) and t["k"].h.shape == (3, 3)
    assert not t["w"].transposed and t["w"].h.shape == (4, 4)
    assert torch.equal(t["k"].full(t["k"].w), model.k.detach())
    for entry in (dense_entry(t["k"], -6), lowrank_entry(t["k"], 2, -5, -7)):
        decoded = entry_tensor(entry)
        assert decoded.shape == (3, 5)
        assert (decoded - model.k.detach()).abs().max() < 1.5
    a = entry_tensor(lowrank_entry(t["k"], 3, -120, -120))  # full rank, bins of 2^-15: k itself
    torch.testing.assert_close(a, model.k.detach(), atol=1e-4, rtol=0)
    results = estimate(model, loss_fn, [0.5, 0.05])
    assert results[0].norms == "data-aware"
    for r in results:
        for c in r.choices:  # the kernels' codes describe their transposes
            coded_kernel = c["name"] in ("k", "k2") and c["kind"] in ("dense", "lowrank")
            assert c["transposed"] is (True if coded_kernel else None)
        probe = copy.deepcopy(model)
        probe.load_state_dict(decode(r.payload))
        assert loss_fn(probe) == r.coarse_loss <= r.base_loss + r.eps


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


class KernelLayout(nn.Module):
    """mdlgrok's one-block transformer rewritten as the paper's JAX code lays it out: kernels
    (inputs x outputs) applied as x @ k, the positional table looked up, q, k and the softmax
    computed (the paper's einsum then sums the values)."""

    def __init__(self, model):
        super().__init__()
        sd, self.heads = model.state_dict(), model.cfg.heads
        for name, value in sd.items():
            key = name.replace("blocks.0.", "").replace("attn.", "").replace(".", "_")
            kernel = value.ndim == 2 and not name.startswith(("embed", "pos"))
            self.register_parameter(key, nn.Parameter((value.T if kernel else value).clone()))

    def forward(self, tokens):
        b, t = tokens.shape
        d = self.embed_weight.shape[1]
        x = self.embed_weight[tokens] + self.pos_weight[torch.arange(t)]
        split = lambda z: z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = (split(x @ getattr(self, f"{n}_weight") + getattr(self, f"{n}_bias")) for n in "qkv")
        w = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k), -1)
        a = torch.einsum("bhqk,bhvd->bhqd", w, v).transpose(1, 2).reshape(b, t, d)
        x = F.layer_norm(x + a @ self.o_weight + self.o_bias, (d,), self.ln1_weight, self.ln1_bias, 1e-6)
        h = F.gelu(x @ self.fc1_weight + self.fc1_bias, approximate="tanh") @ self.fc2_weight + self.fc2_bias
        x = F.layer_norm(x + h, (d,), self.ln2_weight, self.ln2_bias, 1e-6)
        return (x @ self.readout_weight + self.readout_bias)[:, -1]


def test_the_papers_kernel_layout_gives_the_search_the_same_matrices_and_norms():
    """A checkpoint in the layout of the paper's own code: each kernel is coded as the transpose
    of mdlgrok's weight, data-aware. The values' inputs are the same in both; the later layers
    see every position in the port (mdlgrok computes only the one read out), so their H differ."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab=7, d_model=16, heads=2, d_mlp=32, pos_rows=7))
    port = KernelLayout(model)
    data = make_dataset(TaskConfig("add", 5, 0.6, 0))

    def loss_fn(m):
        with torch.no_grad():
            return float(F.cross_entropy(m(data.x_train), data.y_train))

    def moments_of(m):
        return input_moments(loss_fn, m, m.state_dict())

    assert loss_fn(port) == pytest.approx(loss_fn(model), rel=1e-5)
    ours, theirs = ({t.name: t for t in targets_of(m.state_dict(), moments=moments_of(m))} for m in (model, port))
    for name in ("attn.v", "attn.o", "fc1", "fc2"):
        mine, kernel = ours[f"blocks.0.{name}.weight"], theirs[f"{name.replace('attn.', '')}_weight"]
        assert kernel.transposed and not mine.transposed and kernel.h.shape == mine.h.shape
        np.testing.assert_array_equal(kernel.w, mine.w)
    np.testing.assert_allclose(theirs["v_weight"].h, ours["blocks.0.attn.v.weight"].h, rtol=1e-6)
    assert theirs["readout_weight"].transposed and theirs["readout_weight"].h is not None
    assert theirs["readout_weight"].fourier() == ours["readout.weight"].fourier()
