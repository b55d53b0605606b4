"""The priors' Linear layers (common/layers.py SamplingLinear) compute their products in sampling on the CPU in
blocks of output features (codebook heads) or as weight @ x^T (16 to 64 rows, where a probe found it exact):
bitwise the values of one F.linear, so the sampled codes do not change."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common import layers
from common.layers import SamplingLinear, sampling_linear, transposed_is_exact, transposed_linear
from npp.gpt import GPT
from tests.test_rqtransformer import tiny_prior


def operands(rows: int, in_features: int, out_features: int, with_bias: bool):
    generator = torch.Generator().manual_seed(rows * 1000 + in_features + out_features)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    return torch.randn(rows, in_features, generator=generator), weight, bias


@pytest.mark.parametrize("rows", [1, 4, 8, 32, 100])
@pytest.mark.parametrize("in_features", [64, 512, 768])
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_blocked_product_is_bitwise_one_product(rows, in_features, with_bias):
    x, weight, bias = operands(rows, in_features, 2 * layers.BLOCKED_FROM + 300, with_bias)  # a short last block
    with torch.no_grad():
        assert torch.equal(sampling_linear(x, weight, bias), F.linear(x, weight, bias))


@pytest.mark.parametrize("rows", [16, 17, 33, 64, 100])
@pytest.mark.parametrize("in_features, out_features", [(64, 48), (768, 2304), (2048, 768)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_a_shape_the_probe_finds_exact_is_exact_on_other_operands_too(rows, in_features, out_features, with_bias):
    x, weight, bias = operands(rows, in_features, out_features, with_bias)
    if transposed_is_exact(out_features, in_features, rows, with_bias):  # on the CPUs measured: every shape here
        assert torch.equal(transposed_linear(x, weight, bias), F.linear(x, weight, bias))
    with torch.no_grad():
        assert torch.equal(sampling_linear(x[None], weight, bias), F.linear(x[None], weight, bias))


def test_a_shape_whose_probe_differs_keeps_one_f_linear(monkeypatch):
    monkeypatch.setattr(layers, "_transposed_exact", {})
    monkeypatch.setattr(layers, "transposed_linear", lambda x, weight, bias=None: F.linear(x, weight, bias) + 1e-6)
    x, weight, bias = operands(32, 64, 48, True)
    with torch.no_grad():
        assert torch.equal(sampling_linear(x, weight, bias), F.linear(x, weight, bias))
    assert layers._transposed_exact == {(48, 64, 32, True, torch.get_num_threads()): False}


def test_with_autograd_it_is_nn_linear_gradients_included():
    torch.manual_seed(0)
    for out_features in (48, layers.BLOCKED_FROM + 8):
        fast, plain = SamplingLinear(32, out_features), torch.nn.Linear(32, out_features)
        plain.load_state_dict(fast.state_dict())
        x = torch.randn(20, 32)
        fast(x).square().sum().backward()
        plain(x).square().sum().backward()
        assert torch.equal(fast.weight.grad, plain.weight.grad) and torch.equal(fast.bias.grad, plain.bias.grad)


def gpt_codes(vocab_size: int) -> torch.Tensor:
    torch.manual_seed(0)
    model = GPT.from_config({"type": "llamagen-gpt", "dim": 32, "n_layer": 2, "n_head": 2, "vocab_size": vocab_size,
                             "num_classes": 3, "image_tokens": 9}).eval()
    torch.nn.init.normal_(model.output.weight, std=0.5)  # LlamaGen zero-initialises it: every code alike
    labels = torch.arange(8) % 3  # with guidance, 16 rows per product
    return model.generate(labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(1))


def rq_codes(vocab_size: int) -> torch.Tensor:
    model = tiny_prior(vocab_size=vocab_size, block_size=[2, 2, 2])
    torch.nn.init.normal_(model.classifier.linear.weight, std=0.5)
    return model.generate(torch.arange(16) % 3, top_k=50, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("sample", [gpt_codes, rq_codes])
def test_samplers_draw_the_same_codes_with_and_without_the_fast_products(sample, monkeypatch):
    vocab_size = layers.BLOCKED_FROM + 100
    with torch.no_grad():
        fast = sample(vocab_size)
        monkeypatch.setattr(layers, "BLOCKED_FROM", vocab_size + 1)  # one product per layer
        monkeypatch.setattr(layers, "TRANSPOSED_ROWS", (0, -1))
        plain = sample(vocab_size)
    assert torch.equal(fast, plain) and len(fast.unique()) > 1
