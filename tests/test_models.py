import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mdlgrok.models import MLP, Attention, ModelConfig, Transformer, build_model, n_params


def tokens(p: int, batch: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(0, p, (2, batch), generator=g)
    return torch.stack([a, torch.full_like(a, p), b, torch.full_like(a, p + 1)], dim=1)


def test_paper_parameter_counts():
    # the paper's 1-block transformer at p = 113 has 242,547 parameters; 2 blocks 440,819
    assert n_params(build_model(ModelConfig(vocab=115, layers=1))) == 242_547
    assert n_params(build_model(ModelConfig(vocab=115, layers=2))) == 440_819


def test_four_row_positional_table():
    full = build_model(ModelConfig(vocab=115))
    small = build_model(ModelConfig(vocab=115, pos_rows=4))
    assert small.pos.weight.shape == (4, 128)
    assert full.pos.weight.shape == (115, 128)
    assert n_params(full) - n_params(small) == 111 * 128
    assert small(tokens(113)).shape == (16, 115)
    with pytest.raises(ValueError, match="at least 4 rows"):
        ModelConfig(vocab=115, pos_rows=3)


def test_mlp_parameters_and_shapes():
    vocab = 15
    model = build_model(ModelConfig(vocab=vocab, model="mlp"))
    assert isinstance(model, MLP)
    expected = vocab * 128 + (512 * 512 + 512) * 3 + (512 * vocab + vocab)
    assert n_params(model) == expected
    out = model(tokens(13, batch=7))
    assert out.shape == (7, vocab) and out.dtype == torch.float32
    # the readout depends on every input position (the embeddings are concatenated)
    x = tokens(13, batch=1)
    for pos in (0, 2):
        y = x.clone()
        y[0, pos] = (y[0, pos] + 1) % 13
        assert not torch.allclose(model(x), model(y))


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("attention", ["paper", "softmax"])
def test_transformer_output_shape(layers, attention):
    model = build_model(ModelConfig(vocab=13, layers=layers, attention=attention))
    assert isinstance(model, Transformer) and len(model.blocks) == layers
    assert model(tokens(11, batch=5)).shape == (5, 13)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(model="cnn"), "unknown model"),
        (dict(attention="linear"), "unknown attention"),
        (dict(layers=0), "layers"),
        (dict(d_model=130, heads=4), "divisible"),
    ],
)
def test_model_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_initialization_statistics():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab=115, layers=2))
    target = 1 / math.sqrt(128)
    # embeddings N(0, 1/128) (variance)
    for emb in (model.embed.weight, model.pos.weight):
        assert abs(emb.std().item() - target) < 0.05 * target
        assert abs(emb.mean().item()) < 0.05 * target
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * (4 + 2) + 1
    for lin in linears:
        fan_in = lin.weight.shape[1]
        w = lin.weight.detach()
        std = 1 / math.sqrt(fan_in)  # truncated normal with variance 1 / fan_in
        assert abs(w.std().item() - std) < 0.05 * std, lin
        # truncated at two standard deviations of the underlying normal
        assert w.abs().max().item() <= 2 * std / 0.87962566103423978 + 1e-7
        assert w.abs().max().item() > 1.5 * std  # but not clipped to something narrower
        assert torch.count_nonzero(lin.bias) == 0
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 4
    for ln in norms:
        assert ln.eps == 1e-6
        assert torch.all(ln.weight == 1) and torch.count_nonzero(ln.bias) == 0


def test_mlp_initialization():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab=115, model="mlp"))
    assert abs(model.embed.weight.std().item() - 1 / math.sqrt(128)) < 0.05 / math.sqrt(128)
    first = model.hidden[0].weight
    assert first.shape == (512, 512)
    assert abs(first.std().item() - 1 / math.sqrt(512)) < 0.05 / math.sqrt(512)
    assert all(torch.count_nonzero(m.bias) == 0 for m in model.modules() if isinstance(m, nn.Linear))


def heads(z: torch.Tensor, h: int) -> torch.Tensor:
    b, t, d = z.shape
    return z.view(b, t, h, d // h).transpose(1, 2)


def paper_attention_reference(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """The paper's code, literally: softmax weights, then einsum('bhqk,bhvd->bhqd')."""
    q, k, v = (heads(f(x), attn.heads) for f in (attn.q, attn.k, attn.v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    out = torch.einsum("bhqk,bhvd->bhqd", weights, v)
    b, t, d = x.shape
    return attn.o(out.transpose(1, 2).reshape(b, t, d))


def softmax_attention_reference(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    q, k, v = (heads(f(x), attn.heads) for f in (attn.q, attn.k, attn.v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    b, t, d = x.shape
    return attn.o((weights @ v).transpose(1, 2).reshape(b, t, d))


def test_paper_attention_is_the_plain_sum_of_values():
    torch.manual_seed(0)
    attn = Attention(ModelConfig(vocab=13, attention="paper"))
    x = torch.randn(3, 4, 128)
    out = attn(x)
    # identical to the paper's einsum ...
    torch.testing.assert_close(out, paper_attention_reference(attn, x), rtol=1e-5, atol=1e-5)
    # ... which gives every position o(sum of the value vectors)
    summed = attn.o(attn.v(x).sum(dim=1, keepdim=True)).expand(-1, 4, -1)
    torch.testing.assert_close(out, summed, rtol=1e-5, atol=1e-5)
    assert torch.allclose(out[:, 0], out[:, 3])


def test_paper_attention_gives_no_gradient_to_queries_and_keys():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab=13, layers=2, attention="paper"))
    F.cross_entropy(model(tokens(11)), torch.arange(16) % 11).backward()
    for block in model.blocks:
        for lin in (block.attn.q, block.attn.k):
            for p in lin.parameters():
                assert p.grad is None or torch.count_nonzero(p.grad) == 0
        assert block.attn.v.weight.grad is not None and block.attn.v.weight.grad.abs().sum() > 0


def test_softmax_attention_is_standard_and_trains_queries_and_keys():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab=13, attention="softmax")
    attn = Attention(cfg)
    x = torch.randn(3, 4, 128)
    out = attn(x)
    torch.testing.assert_close(out, softmax_attention_reference(attn, x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, paper_attention_reference(attn, x), atol=1e-3)
    assert not torch.allclose(out[:, 0], out[:, 3], atol=1e-4)  # positions differ

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab=13, layers=2, attention="softmax"))
    F.cross_entropy(model(tokens(11)), torch.arange(16) % 11).backward()
    for block in model.blocks:
        for lin in (block.attn.q, block.attn.k):
            assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_same_weights_paper_and_softmax_models_differ():
    torch.manual_seed(0)
    paper = build_model(ModelConfig(vocab=13, attention="paper"))
    soft = build_model(ModelConfig(vocab=13, attention="softmax"))
    soft.load_state_dict(paper.state_dict())
    x = tokens(11)
    assert not torch.allclose(paper(x), soft(x), atol=1e-4)


def full_forward(model: Transformer, toks: torch.Tensor) -> torch.Tensor:
    """Every block computes every position; read the last one out."""
    x = model.embed(toks) + model.pos.weight[: toks.shape[1]]
    for block in model.blocks:
        x = block(x, last_only=False)
    assert x.shape[1] == 4
    return model.readout(x[:, -1])


def manual_forward(model: Transformer, toks: torch.Tensor) -> torch.Tensor:
    """The post-LN transformer written out from scratch, all positions."""
    x = model.embed(toks) + model.pos.weight[:4]
    for blk in model.blocks:
        ref = paper_attention_reference if model.cfg.attention == "paper" else softmax_attention_reference
        x = blk.ln1(x + ref(blk.attn, x))
        x = blk.ln2(x + blk.fc2(F.gelu(blk.fc1(x), approximate="tanh")))
    return model.readout(x[:, -1])


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("attention", ["paper", "softmax"])
def test_last_only_matches_full_computation(layers, attention):
    torch.manual_seed(1)
    model = build_model(ModelConfig(vocab=13, layers=layers, attention=attention))
    with torch.no_grad():  # make the (otherwise zero) biases matter
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_(0, 0.1)
    x = tokens(11, batch=32)
    logits = model(x)
    torch.testing.assert_close(logits, full_forward(model, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, manual_forward(model, x), rtol=1e-4, atol=1e-4)


def test_block_is_post_layernorm_with_tanh_gelu():
    torch.manual_seed(0)
    blk = build_model(ModelConfig(vocab=13)).blocks[0]
    x = torch.randn(2, 4, 128) * 3
    h = blk.ln1(x + blk.attn(x))
    expected = blk.ln2(h + blk.fc2(F.gelu(blk.fc1(h), approximate="tanh")))
    erf_form = blk.ln2(h + blk.fc2(F.gelu(blk.fc1(h))))
    torch.testing.assert_close(blk(x), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(blk(x), erf_form, atol=1e-6)
