"""The CPU draw of common/multinomial.py, over the kept tokens only, is torch.multinomial's draw over all of them.

torch.multinomial(probs, 1) turns one generator word per vocabulary entry into Exp(1) noise and takes
the argmax of probs / noise (with or without replacement); the compact draw takes the same words and
must give the same token and leave the generator in the same state, seed after seed.
"""
from __future__ import annotations

import pytest
import torch

from common.multinomial import multinomial_draw
from common.sampling import sample_from_logits, sampling_distribution, sampling_probs

SEEDS = range(250)


def logits_of(seed: int, batch: int, vocab_size: int) -> torch.Tensor:
    return 3 * torch.randn(batch, vocab_size, generator=torch.Generator().manual_seed(10_000 + seed))


@pytest.mark.parametrize("replacement", [True, False])
@pytest.mark.parametrize("knobs", [
    {"top_k": 25},  # compact: the draw runs over the 25 kept tokens
    {"top_k": 1},  # greedy, compact
    {"temperature": 0.7},  # no filter: the draw runs over the whole vocabulary
    {"top_k": 25, "top_p": 0.9},  # top-p: the masked full vector
])
def test_the_draw_equals_torch_multinomial_seed_after_seed(knobs, replacement):
    for seed in SEEDS:
        logits = logits_of(seed, 3, 300)
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        token = sample_from_logits(logits, generator=ours, **knobs)
        expected = torch.multinomial(sampling_probs(logits, **knobs), 1, replacement, generator=theirs)[:, 0]
        assert torch.equal(token, expected), seed
        assert torch.equal(ours.get_state(), theirs.get_state()), seed


def test_the_compact_draw_at_the_released_vocabulary_and_the_global_generator():
    for seed in range(12):
        logits = logits_of(seed, 8, 16384)
        probs, indices = sampling_distribution(logits, top_k=250, top_p=1.0)  # the official FFHQ / LSUN filters
        assert indices.shape == (8, 250) and bool((indices.diff(dim=-1) > 0).all())
        torch.manual_seed(seed)
        token = multinomial_draw(probs, indices, 16384)
        after = torch.get_rng_state()
        torch.manual_seed(seed)
        assert torch.equal(token, torch.multinomial(sampling_probs(logits, top_k=250, top_p=1.0), 1)[:, 0])
        assert torch.equal(after, torch.get_rng_state())


def test_a_tie_at_the_kth_value_keeps_every_tied_token():
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    probs, indices = sampling_distribution(logits, top_k=2)
    assert indices is None and bool((probs[0, 1:3] > 0).all())  # the masked full vector, three tokens kept
    seen = {int(sample_from_logits(logits, top_k=2, generator=torch.Generator().manual_seed(s))[0]) for s in range(50)}
    assert seen == {0, 1, 2}


def test_an_invalid_distribution_is_refused_as_torch_multinomial_refuses_it():
    logits = torch.tensor([[0.0, float("nan"), 1.0]])
    for knobs in ({}, {"top_k": 2}):
        with pytest.raises(RuntimeError, match="probability tensor contains"):
            sample_from_logits(logits, **knobs)
