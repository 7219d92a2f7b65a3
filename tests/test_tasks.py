import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mdlgrok.tasks import OPERATIONS, PAPER_LAYERS, TaskConfig, epoch_batches, is_prime, make_dataset, paper_batch_size

PYTHON_OPS = {
    "add": lambda a, b, p: (a + b) % p,
    "sub": lambda a, b, p: (a - b) % p,
    "mul": lambda a, b, p: (a * b) % p,
    "div": lambda a, b, p: (a * pow(b, -1, p)) % p,
    "sq": lambda a, b, p: (a * a + b * b) % p,
    "quad": lambda a, b, p: (a * a + a * b + b * b) % p,
}


def all_examples(data):
    return torch.cat([data.x_train, data.x_test]), torch.cat([data.y_train, data.y_test])


def test_six_operations_with_paper_fractions_and_layers():
    assert set(OPERATIONS) == set(PYTHON_OPS)
    assert {k: v[1] for k, v in OPERATIONS.items()} == {
        "add": 0.2,
        "sub": 0.3,
        "mul": 0.2,
        "div": 0.3,
        "sq": 0.4,
        "quad": 0.6,
    }
    assert PAPER_LAYERS == {"add": 1, "sub": 2, "mul": 1, "div": 2, "sq": 1, "quad": 1, "digits": 2}


@pytest.mark.parametrize("task", sorted(PYTHON_OPS))
@pytest.mark.parametrize("p", [5, 7, 13])
def test_targets_match_python_arithmetic(task, p):
    x, y = all_examples(make_dataset(TaskConfig(task, p)))
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    for (a, op, b, eq), c in zip(x.tolist(), y.tolist()):
        assert op == p and eq == p + 1
        assert c == PYTHON_OPS[task](a, b, p), (task, a, b)
    # every pair exactly once (division: b != 0)
    pairs = {(a, b) for a, _, b, _ in x.tolist()}
    expected = {(a, b) for a in range(p) for b in range(p) if task != "div" or b != 0}
    assert len(pairs) == len(x) == len(expected) and pairs == expected


def test_division_is_multiplication_by_inverse():
    p = 11
    x, y = all_examples(make_dataset(TaskConfig("div", p)))
    assert len(x) == p * (p - 1)
    assert (x[:, 2] != 0).all()
    for (a, _, b, _), c in zip(x.tolist(), y.tolist()):
        assert (c * b) % p == a  # c = a / b  <=>  c * b = a


@pytest.mark.parametrize("task,p,frac", [("add", 13, None), ("div", 13, None), ("quad", 7, 0.5), ("sub", 11, 0.77)])
def test_split_sizes_floor(task, p, frac):
    cfg = TaskConfig(task, p, frac)
    data = make_dataset(cfg)
    n = p * (p - 1) if task == "div" else p * p
    f = OPERATIONS[task][1] if frac is None else frac
    assert cfg.frac == f
    assert len(data.y_train) == len(data.x_train) == math.floor(f * n)
    assert len(data.y_train) + len(data.y_test) == n


def test_split_is_seeded_and_deterministic():
    a, b = make_dataset(TaskConfig("add", 13, seed=3)), make_dataset(TaskConfig("add", 13, seed=3))
    c = make_dataset(TaskConfig("add", 13, seed=4))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_test, b.x_test)
    assert torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_train, c.x_train)
    # train and test are disjoint
    tr = {tuple(r) for r in a.x_train.tolist()}
    te = {tuple(r) for r in a.x_test.tolist()}
    assert not tr & te


def test_split_is_a_permutation_not_the_first_rows():
    data = make_dataset(TaskConfig("add", 13, seed=0))
    first = [[a, 13, b, 14] for a in range(13) for b in range(13)][: len(data.x_train)]
    assert data.x_train.tolist() != first


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(task="pow"), "unknown task"),
        (dict(p=2), "at least 3"),
        (dict(task="div", p=12), "prime"),
        (dict(frac=0.0), r"\(0, 1\)"),
        (dict(frac=1.0), r"\(0, 1\)"),
        (dict(frac=1.5), r"\(0, 1\)"),
        (dict(frac=-0.1), r"\(0, 1\)"),
    ],
)
def test_task_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TaskConfig(**{"task": "add", "p": 7, **kwargs})


def test_non_prime_modulus_allowed_without_division():
    data = make_dataset(TaskConfig("mul", 12))
    assert len(data.y_train) + len(data.y_test) == 144


def test_empty_train_set_rejected():
    with pytest.raises(ValueError, match="empty"):
        make_dataset(TaskConfig("add", 3, frac=0.1))  # floor(0.9) = 0


def test_is_prime():
    assert [n for n in range(20) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19]
    assert is_prime(113)


def test_paper_batch_size():
    # add at p=113: floor(0.2 * 12769) = 2553 train examples -> 512
    assert paper_batch_size(2553) == 512
    assert paper_batch_size(1024) == 512
    assert paper_batch_size(1000) == 500
    assert paper_batch_size(9) == 4
    assert paper_batch_size(1) == 1


@pytest.mark.parametrize("n,batch", [(9, 4), (10, 5), (2553, 512), (7, 7), (5, 8)])
def test_epoch_batches_cover_every_index_once(n, batch):
    g = torch.Generator().manual_seed(0)
    batches = epoch_batches(n, batch, g)
    assert len(batches) == math.ceil(n / batch)
    assert all(len(b) == batch for b in batches[:-1])
    assert len(batches[-1]) == (n % batch or min(batch, n))  # the remainder batch is kept
    assert sorted(torch.cat(batches).tolist()) == list(range(n))


def test_epoch_batches_reshuffle_each_epoch_and_are_seeded():
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    e1, e2 = torch.cat(epoch_batches(50, 16, g1)), torch.cat(epoch_batches(50, 16, g1))
    assert not torch.equal(e1, e2)  # a fresh permutation per epoch
    assert torch.equal(e1, torch.cat(epoch_batches(50, 16, g2)))  # same seed, same order


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**31))
def test_paper_batches_partition_any_train_set(n, seed):
    batch = paper_batch_size(n)
    assert 1 <= batch <= 512 and (batch == 512 or batch == max(1, n // 2))
    batches = epoch_batches(n, batch, torch.Generator().manual_seed(seed))
    sizes = [len(b) for b in batches]
    assert sum(sizes) == n and max(sizes) == min(batch, n) and all(s > 0 for s in sizes)
    assert torch.equal(torch.cat(batches).sort().values, torch.arange(n))
