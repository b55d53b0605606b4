"""The priors' codebook heads (common/layers.py WideLinear) compute in blocks of output features when
sampling on the CPU: bitwise the values of one F.linear, so the sampled codes do not change."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common import layers
from common.layers import WideLinear, blocked_linear
from npp.gpt import GPT
from tests.test_rqtransformer import tiny_prior


@pytest.mark.parametrize("rows", [1, 4, 8, 32, 100])
@pytest.mark.parametrize("in_features", [64, 512, 768])
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_blocked_product_is_bitwise_one_product(rows, in_features, with_bias):
    generator = torch.Generator().manual_seed(rows * 1000 + in_features)
    out_features = 2 * layers.BLOCKED_FROM + 300  # a last block shorter than the others
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    x = torch.randn(rows, in_features, generator=generator)
    with torch.no_grad():
        blocked = blocked_linear(x, weight, bias)
    assert torch.equal(blocked, F.linear(x, weight, bias))


def test_with_autograd_it_is_nn_linear_gradients_included():
    torch.manual_seed(0)
    wide, plain = WideLinear(32, layers.BLOCKED_FROM + 8), torch.nn.Linear(32, layers.BLOCKED_FROM + 8)
    plain.load_state_dict(wide.state_dict())
    x = torch.randn(6, 32)
    wide(x).square().sum().backward()
    plain(x).square().sum().backward()
    assert torch.equal(wide.weight.grad, plain.weight.grad) and torch.equal(wide.bias.grad, plain.bias.grad)


def gpt_codes(vocab_size: int) -> torch.Tensor:
    torch.manual_seed(0)
    model = GPT.from_config({"type": "llamagen-gpt", "dim": 32, "n_layer": 2, "n_head": 2, "vocab_size": vocab_size,
                             "num_classes": 3, "image_tokens": 9}).eval()
    torch.nn.init.normal_(model.output.weight, std=0.5)  # LlamaGen zero-initialises it: every code alike
    return model.generate(torch.tensor([0, 2]), cfg_scale=2.0, generator=torch.Generator().manual_seed(1))


def rq_codes(vocab_size: int) -> torch.Tensor:
    model = tiny_prior(vocab_size=vocab_size, block_size=[2, 2, 2])
    torch.nn.init.normal_(model.classifier.linear.weight, std=0.5)
    return model.generate(torch.tensor([0, 1, 2]), top_k=50, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("sample", [gpt_codes, rq_codes])
def test_samplers_draw_the_same_codes_with_and_without_blocks(sample, monkeypatch):
    vocab_size = layers.BLOCKED_FROM + 100
    with torch.no_grad():
        blocked = sample(vocab_size)
        monkeypatch.setattr(layers, "BLOCKED_FROM", vocab_size + 1)  # one product
        whole = sample(vocab_size)
    assert torch.equal(blocked, whole) and len(blocked.unique()) > 1
