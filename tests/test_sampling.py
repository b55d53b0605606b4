"""Logit filtering shared by the priors: temperature, top-k (ties kept), top-p, guidance, knob validation."""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from common.errors import ConfigError
from common.sampling import (cfg_mix, check_sampling_knobs, filter_logits, per_depth, sample_from_logits,
                             sampling_probs, top_p_mask)


def test_top_k_keeps_ties_at_the_kth_value():
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.0]])
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept.tolist() == [[True, True, True, False, False]]
    probs = sampling_probs(logits, top_k=2)
    assert probs[0, 3:].sum() == 0 and probs[0, 1] == probs[0, 2]


def test_temperature_is_applied_before_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    probs = sampling_probs(logits, temperature=0.5, top_k=2)
    expected = torch.softmax(torch.tensor([4.0, 2.0]), dim=0)
    assert_close(probs[0, :2], expected)
    assert probs[0, 2] == 0


def test_top_p_keeps_the_token_that_crosses_p():
    probs = torch.tensor([[0.2, 0.5, 0.3]])
    assert top_p_mask(probs, 0.6).tolist() == [[True, False, False]]  # 0.5 < 0.6, 0.5 + 0.3 reaches it
    assert top_p_mask(probs, 0.5).tolist() == [[True, False, True]]  # the top-1 alone reaches 0.5
    out = sampling_probs(probs.log(), top_p=0.6)
    assert_close(out, torch.tensor([[0.0, 0.625, 0.375]]))


def test_tiny_top_p_keeps_only_the_most_likely_token():
    logits = torch.randn(16, 50)
    probs = sampling_probs(logits, top_p=1e-6)
    assert torch.equal(probs.argmax(-1), logits.argmax(-1))
    assert torch.equal(probs.max(-1).values, torch.ones(16))


def test_top_p_one_and_disabled_filters_keep_everything():
    logits = torch.randn(8, 40)
    full = torch.softmax(logits, dim=-1)
    for top_k, top_p in [(None, None), (40, 1.0), (1000, None), (None, 1.0)]:
        probs = sampling_probs(logits, top_k=top_k, top_p=top_p)
        assert (probs > 0).all()
        assert_close(probs, full)
        assert filter_logits(logits, top_k, top_p).isfinite().all()


def test_probabilities_match_the_official_order_of_operations():
    """temperature -> top-k on logits -> softmax -> nucleus on probabilities -> renormalise."""
    torch.manual_seed(0)
    logits = torch.randn(64, 100) * 3
    temperature, k, p = 0.8, 20, 0.7
    scaled = logits / temperature
    scaled = scaled.masked_fill(scaled < scaled.topk(k).values[:, -1:], -math.inf)
    probs = torch.softmax(scaled, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    cumulative = sorted_probs.cumsum(-1)
    drop_sorted = torch.cat([torch.zeros(64, 1, dtype=torch.bool), cumulative[:, :-1] >= p], dim=1)
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    expected = probs.masked_fill(drop, 0)
    expected = expected / expected.sum(-1, keepdim=True)
    assert torch.equal(sampling_probs(logits, temperature, k, p), expected)


def test_one_multinomial_draw_per_call_from_the_given_generator():
    logits = torch.randn(5, 30)
    probs = sampling_probs(logits, 0.9, 7, 0.8)
    torch.manual_seed(3)
    expected = torch.multinomial(probs, 1)[:, 0]
    torch.manual_seed(3)
    assert torch.equal(sample_from_logits(logits, 0.9, 7, 0.8), expected)
    first = sample_from_logits(logits, generator=torch.Generator().manual_seed(1))
    again = sample_from_logits(logits, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again) and first.dtype == torch.int64 and first.shape == (5,)


def test_greedy_is_top_k_one():
    logits = torch.randn(10, 30)
    assert torch.equal(sample_from_logits(logits, top_k=1), logits.argmax(-1))


def test_cfg_mix():
    cond, uncond = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert torch.equal(cfg_mix(cond, uncond, 3.0), torch.tensor([[4.0, -2.0]]))
    assert torch.equal(cfg_mix(cond, uncond, 0.0), uncond)


@pytest.mark.parametrize("knobs, message", [
    ((1.0, 0, None), "--top-k must be >= 1, got 0"),
    ((1.0, [5, -1], None), "--top-k must be >= 1, got -1"),
    ((1.0, 2.5, None), "--top-k must be >= 1, got 2.5"),
    ((1.0, None, 0.0), "--top-p must be in (0, 1], got 0.0"),
    ((1.0, None, 1.5), "--top-p must be in (0, 1], got 1.5"),
    ((0.0, None, None), "--temperature must be > 0, got 0.0"),
])
def test_bad_knobs_are_refused_in_one_line(knobs, message):
    with pytest.raises(ConfigError) as error:
        check_sampling_knobs(*knobs)
    assert str(error.value) == message
    with pytest.raises(ConfigError):
        sample_from_logits(torch.randn(2, 10), *knobs)


def test_per_depth_values():
    assert per_depth(5, 4, "--top-k") == [5, 5, 5, 5]
    assert per_depth([5], 3, "--top-k") == [5, 5, 5]
    assert per_depth(None, 2, "--top-p") == [None, None]
    assert per_depth([1, 2, 3], 3, "--top-k") == [1, 2, 3]
    with pytest.raises(ConfigError, match="--top-k takes one value or one per depth"):
        per_depth([1, 2], 3, "--top-k")
