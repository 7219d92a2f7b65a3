"""The estimator is honest: every figure is the length of a real payload that decodes, with
mdlgrok's own decoder, into weights whose loss (the caller's closure) meets the constraint."""

import bz2
import copy
import math
import pickle
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from mdlgrok.complexity import LossError, decode, estimate, naive_bits, paper_estimate
from mdlgrok.complexity.estimate import read_rows
from mdlgrok.complexity.moments import RowReads
from mdlgrok.complexity.search import LossOracle
from mdlgrok.models import ModelConfig, build_model
from mdlgrok.tasks import TaskConfig, make_dataset
from mdlgrok.training.objective import evaluate


# ---------------------------------------------------------------- models and closures
def ce_closure(x, y):
    def loss_fn(module):
        with torch.no_grad():
            return float(F.cross_entropy(module(x), y))

    return loss_fn


def tiny_transformer(seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(vocab=7, d_model=16, heads=2, d_mlp=32))  # p = 5


def task_data():
    return make_dataset(TaskConfig("add", 5, 0.6, 0))


def trained_transformer():
    data = task_data()
    model = tiny_transformer(1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(data.x_train), data.y_train).backward()
        opt.step()
    return model, data


def train_generic(model, x, y, steps=150, lr=2e-2):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


class TiedLM(nn.Module):
    """An embedding whose matrix is also the readout (tied weights)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 8)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 6, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.tanh(self.mid(self.emb(x))))


def check_honest(model, loss_fn, results, eps):
    """The honesty contract, checked with an independent copy of the model."""
    base = loss_fn(model)
    assert [r.eps for r in results] == [float(e) for e in eps]
    for r in results:
        assert r.bits == 8 * len(r.payload)
        assert r.codec_bits[r.codec] == r.bits == min(r.codec_bits.values())
        assert r.base_loss == base
        state = decode(r.payload)
        assert list(state) == list(model.state_dict())
        probe = copy.deepcopy(model)
        probe.load_state_dict(state)
        assert loss_fn(probe) == r.coarse_loss
        assert r.coarse_loss <= base + r.eps
        assert r.naive_bits == naive_bits(model)
        assert r.ratio == r.naive_bits / r.bits
        names = [c["name"] for c in r.choices]  # a tensor split into blocks of rows: its blocks after all
        assert names[: len(state)] == list(model.state_dict()) and set(names[len(state) :]) <= set(state)
        assert 0 < r.loss_seconds <= r.seconds and r.search_over_loss >= 0


# ---------------------------------------------------------------- honesty
@pytest.fixture(scope="module")
def trained():
    model, data = trained_transformer()
    loss_fn = lambda m: evaluate(m, data.x_train, data.y_train)[0]  # noqa: E731
    eps = [0.0625, 1.0, 0.25, 4.0]
    return model, data, loss_fn, eps, estimate(model, loss_fn, eps)


def test_trained_transformer_is_honest(trained):
    model, _, loss_fn, eps, results = trained
    assert loss_fn(model) < 0.5  # it learned something: the constraint binds
    check_honest(model, loss_fn, results, eps)


def test_trained_transformer_compresses(trained):
    _, _, _, _, results = trained
    by_eps = {r.eps: r for r in results}
    assert by_eps[4.0].bits < by_eps[0.0625].bits  # a looser tolerance buys a shorter description
    assert all(r.bits < r.naive_bits for r in results)
    assert all(r.loss_evals == results[0].loss_evals > 0 for r in results)  # one shared search
    assert all(r.seconds == results[0].seconds > 0 for r in results)
    assert all(r.estimator == "mdlgrok" for r in results)


def test_estimate_leaves_the_model_untouched(trained):
    model, _, _, _, _ = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    estimate(model, lambda m: 1.0, eps=[1.0])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_estimate_is_deterministic(trained):
    model, _, loss_fn, _, _ = trained
    a = estimate(model, loss_fn, eps=[0.5, 2.0])
    b = estimate(model, loss_fn, eps=[0.5, 2.0])
    assert [r.payload for r in a] == [r.payload for r in b]


@pytest.fixture(scope="module")
def alone(trained):
    """eps -> the Result of an estimate asked for that eps alone."""
    model, _, loss_fn, eps, _ = trained
    return {e: estimate(model, loss_fn, [e])[0] for e in eps}


def same_answer(a, b) -> bool:
    return (a.payload, a.coarse_loss, a.choices, a.codec) == (b.payload, b.coarse_loss, b.choices, b.codec)


def test_an_eps_gets_the_same_answer_asked_alone_or_with_all(trained, alone):
    *_, results = trained
    assert all(same_answer(r, alone[r.eps]) for r in results)


@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_an_eps_gets_the_same_answer_in_any_subset(trained, alone, data):
    model, _, loss_fn, eps, _ = trained
    subset = data.draw(st.lists(st.sampled_from(eps), min_size=2, max_size=3, unique=True))
    assert all(same_answer(r, alone[r.eps]) for r in estimate(model, loss_fn, subset))


def test_eval_fn_metrics_describe_the_decoded_model(trained):
    model, data, loss_fn, _, _ = trained

    def eval_fn(m):
        return {"coarse_test_acc": evaluate(m, data.x_test, data.y_test)[1], "train_loss_again": loss_fn(m)}

    (r,) = estimate(model, loss_fn, eps=[0.5], eval_fn=eval_fn)
    probe = copy.deepcopy(model)
    probe.load_state_dict(decode(r.payload))
    assert r.extra == {
        "coarse_test_acc": evaluate(probe, data.x_test, data.y_test)[1],
        "train_loss_again": r.coarse_loss,
    }


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    width=st.integers(2, 12),
    scale=st.sampled_from([0.01, 1.0, 30.0]),
    eps=st.lists(st.sampled_from([4.0, 1.0, 0.3, 0.05, 1e-3]), min_size=1, max_size=4, unique=True),
)
def test_random_models_are_honest(seed, width, scale, eps):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    x, y = torch.randn(32, 5, generator=g), torch.randint(0, 4, (32,), generator=g)
    loss_fn = ce_closure(x, y)
    check_honest(model, loss_fn, estimate(model, loss_fn, eps), eps)


def test_random_transformer_is_honest():
    model, data = tiny_transformer(3), task_data()
    loss_fn = ce_closure(data.x_train, data.y_train)
    eps = [2.0, 0.01, 0.5]
    check_honest(model, loss_fn, estimate(model, loss_fn, eps), eps)


def test_quantization_alone_baseline_never_uses_low_rank(trained):
    model, _, loss_fn, _, _ = trained
    eps = [0.25, 1.0]
    results = estimate(model, loss_fn, eps, lowrank=False)
    check_honest(model, loss_fn, results, eps)
    assert all(c["kind"] != "lowrank" for r in results for c in r.choices)


@pytest.mark.parametrize("data_aware", [True, False])
def test_data_aware_and_plain_norms_are_both_honest(trained, data_aware):
    model, _, loss_fn, _, _ = trained
    eps = [0.125, 1.0]
    check_honest(model, loss_fn, estimate(model, loss_fn, eps, data_aware=data_aware), eps)


def test_estimated_gptq_statistics_keep_the_search_honest(trained, monkeypatch):
    from mdlgrok.complexity import search

    monkeypatch.setattr(search, "ESTIMATE_FROM", 0)  # every matrix counts as large: estimates between bins
    model, _, loss_fn, _, _ = trained
    eps = [0.25, 1.0]
    check_honest(model, loss_fn, estimate(model, loss_fn, eps), eps)


def test_data_aware_search_reads_moments_of_the_linear_layers(trained, monkeypatch):
    estimate_module = sys.modules["mdlgrok.complexity.estimate"]  # the package exports the function of that name
    seen = []
    real = estimate_module.targets_of

    def spy(state, rows=None, moments=None):
        seen.append(moments)
        return real(state, rows, moments)

    monkeypatch.setattr(estimate_module, "targets_of", spy)
    model, _, loss_fn, _, _ = trained
    estimate(model, loss_fn, [1.0])
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    used = linear - {"blocks.0.attn.q.weight", "blocks.0.attn.k.weight"}  # q, k: unused by the paper attention
    assert [set(m or {}) for m in seen] == [used | {"embed.weight"}]
    assert isinstance(seen[0]["embed.weight"], RowReads)  # the table: how often each row is looked up
    seen.clear()
    estimate(model, loss_fn, [1.0, 4.0])
    assert [set(m or {}) for m in seen] == [used | {"embed.weight"}]  # one data-aware search for every eps
    seen.clear()
    estimate(model, loss_fn, [1.0], data_aware=False)
    assert seen == [{}]


def test_naive_bits_is_bzip2_of_float32_bytes_per_parameter():
    model = tiny_transformer(0)
    expected = 8 * sum(len(bz2.compress(p.detach().float().numpy().tobytes())) for p in model.parameters())
    assert naive_bits(model) == expected
    assert expected > 8 * 4 * sum(p.numel() for p in model.parameters()) * 0.8  # random floats barely compress


def test_naive_size_is_of_the_weights_at_estimate_time_and_computed_once(monkeypatch):
    model = tiny_transformer(0)
    before = naive_bits(model)

    def loss_fn(m):
        return 1.0 + 1e-3 * float(sum(p.detach().abs().sum() for p in m.parameters()))

    results = estimate(model, loss_fn, [4.0, 2.0])
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # the model changes after the estimate: its naive size is of the weights it measured
    calls = []
    real = bz2.compress
    monkeypatch.setattr(bz2, "compress", lambda data: calls.append(1) or real(data))
    assert [r.naive_bits for r in results] == [before, before]
    assert len(calls) == len(list(model.parameters()))  # bzip2 ran once for both results
    again = pickle.loads(pickle.dumps(results[0]))  # e.g. a Result sent back from a worker process
    assert again.naive_bits == before and again.payload == results[0].payload


# ---------------------------------------------------------------- generic modules
def test_generic_module_with_batchnorm_buffers():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    train_generic(model, x, y)
    model.eval()
    loss_fn = ce_closure(x, y)
    eps = [0.5, 0.1]
    results = estimate(model, loss_fn, eps)
    check_honest(model, loss_fn, results, eps)
    state = decode(results[0].payload)
    assert state["1.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(state["1.num_batches_tracked"], model.state_dict()["1.num_batches_tracked"])  # raw, exact


def test_module_with_tied_weights_keeps_them_tied():
    torch.manual_seed(0)
    model = TiedLM()
    x = torch.randint(0, 6, (30,))
    y = (x + 1) % 6
    train_generic(model, x, y, steps=200, lr=5e-2)
    loss_fn = ce_closure(x, y)
    eps = [0.5, 0.05]
    results = estimate(model, loss_fn, eps)
    check_honest(model, loss_fn, results, eps)
    for r in results:
        kinds = {c["name"]: c["kind"] for c in r.choices}
        assert kinds["out.weight"] == "alias"  # stored once
        state = decode(r.payload)
        assert torch.equal(state["emb.weight"], state["out.weight"])


class Lookup(nn.Module):
    """A table of 13 rows periodic along the residues and 2 rows that are not residues, read by
    lookup (frozen), and a readout."""

    def __init__(self):
        super().__init__()
        angle = 2 * math.pi * torch.arange(13.0)[:, None] * torch.tensor([[1.0, 3.0, 5.0]]) / 13
        table = torch.cat([torch.cat([angle.cos(), angle.sin()], 1), torch.eye(6)[:2] * 3])
        self.emb = nn.Embedding.from_pretrained(table)
        self.out = nn.Linear(6, 15)

    def forward(self, x):
        return self.out(self.emb(x))


def test_the_rows_a_tables_fourier_block_leaves_out_are_coded_apart():
    torch.manual_seed(0)
    model = Lookup()
    x = torch.arange(15)
    train_generic(model, x, x, steps=200, lr=5e-2)
    loss_fn = ce_closure(x, x)
    results = estimate(model, loss_fn, [0.3, 0.03])
    check_honest(model, loss_fn, results, [0.3, 0.03])
    for r in results:  # one block of 13 residue rows, in the Fourier basis, and one of the 2 others
        blocks = [(c["kind"], c["rows"], c["fourier"]) for c in r.choices if c["name"] == "emb.weight"]
        assert len(blocks) == 2
        assert blocks[0] in (("zero", None, None), ("dense", 13, 13), ("lowrank", 13, 13))
        assert blocks[1][0] == "zero" or blocks[1][1:] == (2, None)
    assert all(kind != "zero" for kind, *_ in blocks)  # at eps 0.03 both blocks are needed


def test_float64_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,))
    loss_fn = ce_closure(x, y)
    before = copy.deepcopy(model.state_dict())
    results = estimate(model, loss_fn, [0.3])
    check_honest(model, loss_fn, results, [0.3])
    assert decode(results[0].payload)["0.weight"].dtype == torch.float64
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class WithExtraState(nn.Sequential):
    """A module whose state dict holds a non-tensor entry (get_extra_state)."""

    def get_extra_state(self):
        return {"tokenizer": "bytes"}

    def set_extra_state(self, state):
        pass


def test_a_module_with_extra_state_codes_its_tensors_alone():
    torch.manual_seed(0)
    model = WithExtraState(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    x, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    loss_fn = ce_closure(x, y)
    (r,) = estimate(model, loss_fn, [0.3], eval_fn=lambda m: {"loss": loss_fn(m)})
    assert r.extra == {"loss": r.coarse_loss}
    state = decode(r.payload)
    assert sorted(state) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    probe = copy.deepcopy(model)
    assert probe.load_state_dict(state, strict=False).missing_keys == ["_extra_state"]
    assert loss_fn(probe) == r.coarse_loss <= r.base_loss + 0.3


def test_moments_that_no_target_can_use_leave_one_search_in_plain_norms(monkeypatch):
    """A (d x 1) kernel read as x @ w has moments but no rank or GPTQ to use them: the result
    says plain norms, and one search runs."""
    estimate_module = sys.modules["mdlgrok.complexity.estimate"]
    searches = []
    real = estimate_module.Search
    monkeypatch.setattr(estimate_module, "Search", lambda *a, **k: searches.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = nn.ParameterDict({"e": nn.Parameter(torch.randn(5, 8)), "w": nn.Parameter(torch.randn(8, 1))})
    x, y = torch.randint(0, 5, (30,)), torch.randn(30, 1)

    def loss_fn(m):
        with torch.no_grad():
            return float(((m["e"][x] @ m["w"] - y) ** 2).mean())

    (r,) = estimate(model, loss_fn, [4.0])
    assert r.norms == "frobenius (no matrix read only as a linear map)" and len(searches) == 1


def test_closure_failing_on_every_coarse_model_falls_back_to_lossless():
    """A loss that is NaN unless the weights are exactly the original: no coarse model is
    feasible, so the description is the lossless one, never an unverified number."""
    torch.manual_seed(0)
    for model in (nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), Lookup()):  # Lookup: a table in two blocks
        reference = copy.deepcopy(model.state_dict())

        def loss_fn(m, reference=reference):
            if isinstance(m, Lookup):
                m(torch.arange(2))  # a lookup: its table is one
            same = all(torch.equal(v, reference[k]) for k, v in m.state_dict().items())
            return 0.7 if same else math.nan

        (r,) = estimate(model, loss_fn, [1.0])
        assert r.coarse_loss == 0.7
        assert [c["kind"] for c in r.choices] == ["raw"] * len(reference)  # one entry per tensor
        state = decode(r.payload)
        assert all(torch.equal(state[k], reference[k]) for k in reference)


# ---------------------------------------------------------------- rows the loss never reads
def test_unread_rows_of_a_positional_table_are_not_coded(trained):
    model, data, loss_fn, eps, results = trained
    assert model.pos.weight.shape[0] == 7  # the paper's layout: as many rows as tokens, 4 read
    assert read_rows(LossOracle(model, loss_fn), loss_fn(model)) == {"pos.weight": (0, 1, 2, 3)}
    for r in results:
        pos = next(c for c in r.choices if c["name"] == "pos.weight")
        assert pos["rows"] == (4 if pos["kind"] in ("dense", "lowrank") else None)
        assert torch.equal(decode(r.payload)["pos.weight"][4:], torch.zeros(3, 16))


class SlicedAndWhole(nn.Module):
    """A table read by slicing its first rows, and as a whole (times zero) as well."""

    def __init__(self, whole: bool):
        super().__init__()
        self.table, self.whole = nn.Parameter(torch.randn(6, 4)), whole
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = x @ self.table[:2]
        return self.out(h + (0 * self.table.sum() if self.whole else 0))


@pytest.mark.parametrize("whole", [False, True])
def test_rows_read_in_any_way_are_kept(whole):
    torch.manual_seed(0)
    model, x = SlicedAndWhole(whole), torch.randn(32, 2)
    y = model(x).argmax(-1)
    loss_fn = ce_closure(x, y)
    rows = read_rows(LossOracle(model, loss_fn), loss_fn(model))
    assert rows == ({} if whole else {"table": (0, 1)})
    check_honest(model, loss_fn, estimate(model, loss_fn, [0.1, 1.0]), [0.1, 1.0])


class WithUnusedTable(nn.Module):
    """A linear map and a 64-row table that the forward pass never touches."""

    def __init__(self):
        super().__init__()
        self.out, self.unused = nn.Linear(4, 3), nn.Parameter(torch.randn(64, 4))

    def forward(self, x):
        return self.out(x)


def test_a_matrix_never_read_takes_two_loss_calls_and_is_left_to_the_zero_option():
    torch.manual_seed(0)
    model, x = WithUnusedTable(), torch.randn(32, 4)
    loss_fn = ce_closure(x, model(x).argmax(-1))
    oracle = LossOracle(model, loss_fn)
    assert read_rows(oracle, loss_fn(model)) == {}
    assert oracle.calls == 1 + 2  # out.weight's last row is read; the table's last row and row 0 are not
    (r,) = estimate(model, loss_fn, [0.1])
    assert next(c for c in r.choices if c["name"] == "unused")["kind"] == "zero"


def test_rows_whose_zeros_change_the_loss_are_kept():
    """NaN in rows 2.. leaves this loss unchanged but zeros there change it: nothing is dropped."""
    torch.manual_seed(0)
    model, x = SlicedAndWhole(False), torch.randn(32, 2)
    base_fn = ce_closure(x, model(x).argmax(-1))

    def loss_fn(m):
        return base_fn(m) + float((m.table[2:] == 0).any())

    assert read_rows(LossOracle(model, loss_fn), loss_fn(model)) == {}


# ---------------------------------------------------------------- the accuracy constraint
@pytest.mark.parametrize("drop", [0.0, 0.25])
def test_accuracy_constraint_keeps_the_training_accuracy(trained, drop):
    model, data, loss_fn, _, _ = trained
    accuracy_fn = lambda m: evaluate(m, data.x_train, data.y_train)[1]  # noqa: E731
    floor = accuracy_fn(model) - drop
    results = estimate(model, loss_fn, [math.inf, 4.0], accuracy_fn=accuracy_fn, accuracy_drop=drop)
    check_honest(model, loss_fn, results, [math.inf, 4.0])
    for r in results:
        probe = copy.deepcopy(model)
        probe.load_state_dict(decode(r.payload))
        assert r.min_accuracy == floor and accuracy_fn(probe) >= floor


def test_accuracy_alone_with_everything_allowed_is_the_loosest_loss_bound(trained):
    """Known answer: with an accuracy floor of ~0 and no loss limit, any model qualifies, as it
    does under a loss limit of 1e6 nats: both searches end at the same coarsest payload."""
    model, data, loss_fn, _, _ = trained
    accuracy_fn = lambda m: evaluate(m, data.x_train, data.y_train)[1]  # noqa: E731
    (r,) = estimate(model, loss_fn, [math.inf], accuracy_fn=accuracy_fn, accuracy_drop=1 - 1e-9)
    (loose,) = estimate(model, loss_fn, [1e6])
    assert r.payload == loose.payload and math.isfinite(r.coarse_loss)


@pytest.mark.parametrize("drop", [-0.1, 1.0, math.nan])
def test_bad_accuracy_drop_is_a_value_error(trained, drop):
    model, data, loss_fn, _, _ = trained
    with pytest.raises(ValueError, match="accuracy_drop"):
        estimate(model, loss_fn, [1.0], accuracy_fn=lambda m: 1.0, accuracy_drop=drop)
    with pytest.raises(ValueError, match="accuracy_drop needs an accuracy_fn"):
        estimate(model, loss_fn, [1.0], accuracy_drop=0.1)


def test_a_non_deterministic_accuracy_fn_is_a_value_error(trained):
    model, _, loss_fn, _, _ = trained
    values = iter([1.0, 0.5])  # the floor read at 1.0, then the original model at 0.5
    with pytest.raises(ValueError, match="deterministic"):
        estimate(model, loss_fn, [1.0], accuracy_fn=lambda m: next(values))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("eps", [0, -1.0, [1.0, 0.0], [0.5, -0.1], math.nan, [math.nan], math.inf, []])
def test_bad_eps_is_a_value_error_before_any_loss_call(eps):
    calls = []
    with pytest.raises(ValueError, match="eps"):
        estimate(tiny_transformer(), lambda m: calls.append(1) or 1.0, eps)
    assert calls == []


@pytest.mark.parametrize("removed", [{"mode": "paper"}, {"mode": "magic"}, {"constraint_fn": lambda m: 1.0}])
def test_the_removed_mode_options_fail_loudly_before_any_loss_call(removed):
    """estimate is mdlgrok's search only: the paper's procedure is paper_estimate, so the old
    mode= and constraint_fn= arguments are rejected, never silently ignored."""
    calls = []
    with pytest.raises(TypeError, match=next(iter(removed))):
        estimate(tiny_transformer(), lambda m: calls.append(1) or 1.0, [1.0], **removed)
    assert calls == []


def test_loss_closure_that_raises_is_a_loss_error():
    def loss_fn(m):
        raise RuntimeError("shape mismatch in my data loader")

    with pytest.raises(LossError, match="RuntimeError: shape mismatch in my data loader") as info:
        estimate(tiny_transformer(), loss_fn, [1.0])
    assert isinstance(info.value, ValueError)


def test_loss_closure_that_raises_later_is_a_loss_error():
    calls = []

    def loss_fn(m):
        calls.append(1)
        if len(calls) > 3:
            raise KeyError("batch")
        return 1.0

    with pytest.raises(LossError, match="KeyError"):
        estimate(tiny_transformer(), loss_fn, [1.0])


@pytest.mark.parametrize("measure", [estimate, paper_estimate])
def test_a_loss_closure_that_changes_between_calls_is_a_loss_error(trained, measure):
    """As with dropout left on: the same weights give another loss each call, so no figure could
    be checked; said before any search, not as a failure to find a feasible payload."""
    model, _, loss_fn, _, _ = trained
    rng = np.random.default_rng(0)
    with pytest.raises(LossError, match="deterministic"):
        measure(model, lambda m: loss_fn(m) + 0.01 * rng.random(), [1.0])


def test_a_loss_closure_with_last_digit_jitter_is_measured(trained):
    """A non-deterministic reduction (a GPU's atomic adds) moves the last digits only: measured."""
    model, _, loss_fn, _, _ = trained
    rng = np.random.default_rng(0)
    r = estimate(model, lambda m: loss_fn(m) * (1 + 1e-9 * rng.random()), [1.0])[0]
    assert r.coarse_loss <= r.base_loss + 1.0 + 1e-6 and r.bits < r.naive_bits


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_of_the_original_is_a_loss_error(value):
    with pytest.raises(LossError, match="non-finite"):
        estimate(tiny_transformer(), lambda m: value, [1.0])


def test_loss_error_is_exported_and_a_value_error():
    assert issubclass(LossError, ValueError)
    assert np.isfinite(estimate(tiny_transformer(), lambda m: 1.0, [1.0])[0].coarse_loss)


@pytest.mark.slow
def test_full_size_transformer_is_honest_at_the_papers_eps():
    """The paper's one-block model (p = 113, about 242k parameters), all seven eps."""
    from mdlgrok.complexity import PAPER_EPS

    data = make_dataset(TaskConfig("add", 113, 0.2, 0))
    torch.manual_seed(0)
    model = build_model(ModelConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(data.x_train), data.y_train).backward()
        opt.step()
    loss_fn = lambda m: evaluate(m, data.x_train, data.y_train)[0]  # noqa: E731
    results = estimate(model, loss_fn, list(PAPER_EPS))
    check_honest(model, loss_fn, results, PAPER_EPS)
    assert all(r.bits < r.naive_bits for r in results)


# ---------------------------------------------------------------- the loss oracle
def test_the_oracle_gives_each_set_of_tensors_its_own_loss_in_any_order():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    x = torch.randn(50, 4)
    loss_fn = ce_closure(x, model(x).argmax(-1))
    oracle = LossOracle(model, loss_fn)
    zero, half = torch.zeros(4, 4), 0.5 * model[0].weight.detach()
    sets = [{}, {"0.weight": zero}, {"0.weight": half}, {"0.weight": half, "2.bias": torch.ones(3)}, {}]
    expected = []
    for tensors in sets:  # each from a fresh copy of the model
        fresh = copy.deepcopy(model)
        fresh.load_state_dict({**model.state_dict(), **tensors})
        expected.append(loss_fn(fresh))
    for order in ([0, 1, 2, 3, 4], [3, 1, 3, 0, 2, 2, 4, 1]):  # the same tensor objects, handed over again
        assert [oracle(sets[i]) for i in order] == [expected[i] for i in order]


def test_the_oracle_keeps_tied_weights_right_whichever_name_is_handed_over():
    torch.manual_seed(0)
    emb, out = nn.Embedding(6, 4), nn.Linear(4, 6, bias=False)
    out.weight = emb.weight  # one tensor under two names
    model = nn.Sequential(emb, out)
    x = torch.randint(0, 6, (40,))
    loss_fn = ce_closure(x, x)
    oracle = LossOracle(model, loss_fn)
    half = 0.5 * emb.weight.detach()
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        fresh[0].weight.copy_(half)
    expected, base = loss_fn(fresh), loss_fn(model)
    for name in ("0.weight", "1.weight", "0.weight"):
        assert oracle({name: half}) == expected and oracle({}) == base


def test_the_oracle_copies_buffers_anew_for_a_forward_pass_that_updates_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).eval()
    x = torch.randn(50, 4)
    y = model(x).argmax(-1)

    def loss_fn(module):  # a train-mode pass moves the running statistics, then an eval-mode loss
        module.train()
        module(x + 3)
        module.eval()
        return ce_closure(x, y)(module)

    oracle = LossOracle(model, loss_fn)
    first = oracle({})
    assert oracle({}) == first == oracle({}) and oracle({"0.bias": torch.zeros(4)}) != first


# ---------------------------------------------------------------- sensitivity probe
def quadratic_oracle(curvatures):
    """Matrices whose loss is 1 + sum_i c_i |W_i - W_i(0)|^2: sensitivity c_i exactly (c = 0: unread)."""
    from mdlgrok.complexity.coarse import targets_of

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(8, 8, bias=False) for _ in curvatures))
    start = [m.weight.detach().clone() for m in model]

    def loss_fn(module):
        with torch.no_grad():
            return 1.0 + sum(float(c * ((m.weight - w) ** 2).sum()) for c, m, w in zip(curvatures, module, start))

    oracle = LossOracle(model, loss_fn)
    return oracle, targets_of(oracle.original)


def test_the_probe_measures_the_curvature_where_the_loss_rises_by_its_target():
    from mdlgrok.complexity.search import PROBE_TARGET, sensitivity

    oracle, (t,) = quadratic_oracle([0.03])
    s, r = sensitivity(t, oracle, 1.0, np.random.default_rng(0))
    assert s == pytest.approx(0.03, rel=1e-4)
    rise = 0.03 * r**2 * (t.w**2).sum()  # the noise has the rms of the weights times r
    assert PROBE_TARGET / 10 <= rise <= PROBE_TARGET * 10 and oracle.calls == 4  # 0.05 too small: once more


def test_each_probe_starts_where_the_last_of_its_kind_ended():
    from mdlgrok.complexity.search import sensitivities

    oracle, targets = quadratic_oracle([0.03, 0.0, 0.03, 0.06])
    counted = []
    real = oracle.__call__
    sens = sensitivities(targets, lambda *a, **k: counted.append(1) or real(*a, **k), 1.0, seed=0)
    assert sens[0] == pytest.approx(0.03, rel=1e-4) and sens[2] == pytest.approx(0.03, rel=1e-4)
    assert sens[1] == 0.0 and sens[3] == pytest.approx(0.06, rel=1e-4)
    # the unread matrix: the first's radius, then the largest noise; the others in one probe
    assert len(counted) == 4 + 4 + 2 + 2


def test_each_option_is_rounded_once_and_a_smaller_store_gives_the_same_payloads(monkeypatch):
    from mdlgrok.complexity import search as S

    model, data = trained_transformer()
    loss_fn = lambda m: evaluate(m, data.x_train, data.y_train)[0]  # noqa: E731
    rounded = []
    real = S.Option.entry
    monkeypatch.setattr(S.Option, "entry", lambda option, t: rounded.append((id(option), t.index)) or real(option, t))
    results = estimate(model, loss_fn, [1.0, 0.25])
    assert len(rounded) == len(set(rounded))  # every tensor's entries fit in the store: none rounded twice
    monkeypatch.setattr(S, "ENTRY_CODES", 1)  # two entries a tensor: rounded again when they come back
    rounded.clear()
    again = estimate(model, loss_fn, [1.0, 0.25])
    assert len(rounded) > len(set(rounded)) and [r.payload for r in again] == [r.payload for r in results]


# ---------------------------------------------------------------- calibration of decoded bins
def test_a_shifted_entry_decodes_scaled_by_its_grid_steps():
    from mdlgrok.complexity.coarse import dense_entry, lowrank_entry, targets_of, zero_entry
    from mdlgrok.complexity.payload import entry_tensor
    from mdlgrok.complexity.search import shifted

    (t,) = targets_of({"w": torch.randn(6, 5, generator=torch.Generator().manual_seed(0))})
    for entry in (dense_entry(t, -16), lowrank_entry(t, 2, -16, -20)):
        for d in (-3, 1, 4):
            np.testing.assert_allclose(
                entry_tensor(shifted(entry, d)).numpy(),
                entry_tensor(entry).numpy() * 2 ** (d / 8),
                rtol=1e-6,
                atol=1e-12,
            )
    assert shifted(zero_entry(t), 2) == zero_entry(t)


def test_calibration_scales_up_an_underconfident_readout():
    from mdlgrok.complexity.coarse import targets_of
    from mdlgrok.complexity.search import MAX_SHIFT, Search

    torch.manual_seed(0)
    x = torch.randn(200, 4)
    y = x.argmax(1)
    model = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        model.weight.copy_(0.3 * torch.eye(4))  # right answers, little confidence: a larger scale lowers the loss
    loss_fn = ce_closure(x, y)
    oracle = LossOracle(model, loss_fn)
    base = oracle({})
    search = Search(targets_of(oracle.original), oracle, base)
    finest = (0,)
    shift = search._calibrate(finest, (0,))
    assert 0 < shift[0] <= MAX_SHIFT
    assert search.loss(finest, shift) < search.loss(finest)
    # the estimate uses it: the decoded weight is scaled up, and still honest
    results = estimate(model, loss_fn, [0.01])
    check_honest(model, loss_fn, results, [0.01])
    assert results[0].coarse_loss < base


@pytest.mark.parametrize(
    "loss_of_shift, shift, calls",
    [
        (lambda d: (d - 5) ** 2, 5, 3),  # one step either side, then the parabola's vertex
        (lambda d: (d - 20) ** 2, 8, 3),  # a vertex past the bound: the bound (MAX_SHIFT = 8)
        (lambda d: -d, 8, 3),  # no curvature: as far as allowed, downhill
        (lambda d: (d + 1) ** 2, -1, 2),  # one step: the vertex is the point already tried
        (lambda d: d**2, 0, 2),  # both sides worse: no move
    ],
)
def test_calibration_of_a_tensor_takes_a_few_loss_calls(monkeypatch, loss_of_shift, shift, calls):
    search = one_hull_search(3)
    asked = []

    def loss(config, shift=None):
        asked.append(shift)
        return float(loss_of_shift(shift[0]))

    monkeypatch.setattr(search, "loss", loss)
    assert search._calibrate((0,), (0,)) == (shift,)
    assert len(asked) == 1 + calls  # the first call is the loss where calibration starts


def test_calibration_never_asks_past_the_bound_nor_past_a_failed_side(monkeypatch):
    from mdlgrok.complexity.search import MAX_SHIFT

    search = one_hull_search(3)
    asked = []

    def loss(config, shift=None):
        asked.append(shift[0])
        return math.inf if shift[0] < -2 else float(-shift[0])  # lower upward; a failed call below -2

    monkeypatch.setattr(search, "loss", loss)
    assert search._calibrate((0,), (MAX_SHIFT,)) == (MAX_SHIFT,)  # at the bound: one step down is worse
    assert max(asked) <= MAX_SHIFT
    one_sided = lambda config, shift=None: math.inf if shift[0] > 0 else float(abs(shift[0] + 2))  # noqa: E731
    monkeypatch.setattr(search, "loss", one_sided)
    assert search._calibrate((0,), (0,)) == (-1,)  # the other side failed: one step, no vertex


def test_calibration_keeps_the_one_step_point_where_the_vertex_is_worse(monkeypatch):
    search = one_hull_search(3)
    losses = {0: 1.0, 1: 0.5, -1: 1.2}  # not convex: the bound (+8) is tried, and it is worse than +1

    monkeypatch.setattr(search, "loss", lambda config, shift=None: losses.get(shift[0], 5.0))
    assert search._calibrate((0,), (0,)) == (1,)


def test_best_calibrates_again_after_a_polish_that_changed_the_configuration(monkeypatch):
    from mdlgrok.complexity import search as S
    from mdlgrok.complexity.coarse import targets_of

    torch.manual_seed(0)
    x = torch.randn(200, 4)
    model = nn.Linear(4, 4, bias=False)
    loss_fn = ce_closure(x, x.argmax(1))
    oracle = LossOracle(model, loss_fn)
    search = S.Search(targets_of(oracle.original), oracle, oracle({}))
    calibrated, polished = [], iter([(1,), (1,)])  # the first polish coarsens, the second does not
    monkeypatch.setattr(search, "starts", lambda eps: [((0,), (0,))])
    monkeypatch.setattr(
        search, "_calibrate", lambda config, shift, share: calibrated.append((config, share)) or (len(calibrated),)
    )
    monkeypatch.setattr(search, "_polish", lambda config, eps, shift: next(polished))
    assert search.best(1.0) == ((1,), (2,))
    # the polished configuration got its own calibration, of the tensors holding CALIB_MIN_SHARE of the bits
    assert calibrated == [((0,), 0.0), ((1,), S.CALIB_MIN_SHARE)]
    calibrated.clear()
    assert search.best(1.0, polish=False) == ((0,), (0,)) and not calibrated


def test_calibration_with_a_share_skips_the_tensors_holding_less_of_the_bits(monkeypatch):
    from mdlgrok.complexity import search as S
    from mdlgrok.complexity.coarse import targets_of

    torch.manual_seed(0)
    x = torch.randn(200, 4)
    model = nn.Linear(4, 4)
    oracle = LossOracle(model, ce_closure(x, x.argmax(1)))
    search = S.Search(targets_of(oracle.original), oracle, oracle({}))
    search.hulls = [[S.Option("dense", 1000.0, 0.0, j=-8)], [S.Option("dense", 5.0, 0.0, j=-8)]]  # weight, bias
    lined = []
    monkeypatch.setattr(search, "_line", lambda config, shift, best, i: lined.append(i) or (shift, best))
    search._calibrate((0, 0), (0, 0))
    assert lined == [0, 1]  # every coded tensor, the largest first
    lined.clear()
    search._calibrate((0, 0), (0, 0), 0.01)
    assert lined == [0]  # the bias holds 5 of 1,005 bits, under 1%


def one_hull_search(points: int):
    """A search over one tensor whose hull is replaced by `points` made-up options (bits 100, 99, ...)."""
    from mdlgrok.complexity import search as S
    from mdlgrok.complexity.coarse import targets_of

    torch.manual_seed(0)
    x = torch.randn(200, 4)
    model = nn.Linear(4, 4, bias=False)
    oracle = LossOracle(model, ce_closure(x, x.argmax(1)))
    search = S.Search(targets_of(oracle.original), oracle, oracle({}))
    search.hulls = [[S.Option("dense", 100.0 - h, float(h)) for h in range(points)]]
    return search


def test_polish_finds_a_far_feasible_hull_point_past_an_infeasible_one_in_few_loss_calls(monkeypatch):
    search = one_hull_search(40)
    feasible = set(range(0, 3)) | set(range(4, 30))  # point 3 fails (a bump), 4-29 hold, 30 on fail
    calls = []
    holds = lambda config, eps, shift=None: calls.append(config) or config[0] in feasible  # noqa: E731
    monkeypatch.setattr(search, "feasible", holds)
    assert search._coarsest([0], 0, 1.0, (0,)) == 29  # steps 1, 2, 4, 8, 16 hold, 32 fails: bisect 16..32
    assert len(calls) <= 11  # one step at a time took 30
    calls.clear()
    search.hulls = [search.hulls[0][:3]]
    assert search._coarsest([0], 0, 1.0, (0,)) == 2 and len(calls) == 2  # up to the hull's last point
    calls.clear()
    assert search._coarsest([2], 0, 1.0, (0,)) == 2 and not calls  # nothing coarser to try


def test_a_payload_that_fails_its_check_gives_the_lossless_one(trained, monkeypatch):
    """Were a chosen configuration's decoded weights to miss the constraint, the eps reports the
    lossless payload (raw bytes), never a figure that was not checked."""
    estimate_module = sys.modules["mdlgrok.complexity.estimate"]
    real = estimate_module.verify

    def failing(entries, oracle):
        payload, loss, sizes, entries = real(entries, oracle)
        lossless = all(e.kind in ("raw", "alias") for e in entries)
        return payload, loss if lossless else math.inf, sizes, entries

    monkeypatch.setattr(estimate_module, "verify", failing)
    model, _, loss_fn, _, _ = trained
    (r,) = estimate(model, loss_fn, [1.0])
    assert {c["kind"] for c in r.choices} <= {"raw", "alias"} and r.coarse_loss == r.base_loss
    assert decode(r.payload).keys() == model.state_dict().keys()


def test_from_multi_start_eps_the_cheapest_starts_of_two_paths_are_refined(monkeypatch):
    from mdlgrok.complexity import search as S

    search = one_hull_search(10)
    cheap, roomy = ((5,), (0,)), ((3,), (0,))  # the cheapest start polishes to 6, the other to 8
    monkeypatch.setattr(search, "starts", lambda eps: [cheap, roomy])
    monkeypatch.setattr(search, "_refined", lambda choice, eps: ((choice[0][0] + (1 if choice == cheap else 5),), (0,)))
    assert search.best(S.MULTI_START_EPS) == ((8,), (0,))  # the start with room wins
    assert search.best(S.MULTI_START_EPS / 2) == ((6,), (0,))  # below, the cheapest start alone
    assert search.best(S.MULTI_START_EPS, polish=False) == cheap
