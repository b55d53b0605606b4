"""The text tokenizer of text-to-image priors: the official tokenisations, trained vocabularies, dropout, refusals.

tests/data/rqvae_t2i/tokenization.json holds the official code's tokenisations of 8 prompts (context 8). The
released vocabulary files are not part of the repository: the exact checks read them from the shared reference
folder when it exists and skip otherwise.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from common.errors import ConfigError, DataError, WeightsError
from common.text_tokenizer import TextTokenizer, prompt_ids
from tests.helpers import DATA, ROOT

OFFICIAL_FOLDER = os.path.join(os.path.dirname(ROOT), "shared", "reference", "vectors", "rqvae_t2i", "tokenizer")
CAPTIONS = ["a red star on a blue background, top left", "a white ring on a green background, center",
            "an orange heart on a black background, bottom right", "a purple cross on a yellow background, top"]


@pytest.fixture(scope="module")
def official_examples():
    with open(os.path.join(DATA, "rqvae_t2i", "tokenization.json")) as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def official():
    if not os.path.isdir(OFFICIAL_FOLDER):
        pytest.skip(f"the released vocabulary files are not at {OFFICIAL_FOLDER}")
    return TextTokenizer.official("bpe16k_huggingface", OFFICIAL_FOLDER, "--text-tokenizer", context_length=8)


def test_official_tokenisations_are_reproduced_exactly(official, official_examples):
    assert official.vocab_size == 16384
    for example in official_examples["examples"]:
        ids = official.encode([example["prompt"]])
        assert ids.dtype == torch.long and ids.tolist() == [example["ids"]], example["prompt"]
        kept, count = official.count(example["prompt"])
        assert count == example["n_tokens_untruncated"], example["prompt"]
        assert kept == example["tokens"][:len(kept)] and len(kept) == min(count, 8), example["prompt"]


def test_a_vocabulary_trained_on_captions_has_pad_0_unk_1_and_lower_cases():
    trained = TextTokenizer.train(CAPTIONS * 5, vocab_size=300, context_length=12)
    again = TextTokenizer.train(CAPTIONS * 5, vocab_size=300, context_length=12)
    assert trained.serialized == again.serialized  # every process trains the same vocabulary
    assert trained.vocab_size <= 300
    ids = trained.encode(["A RED Star on a blue background, top left", "a red zebra"])
    assert ids.shape == (2, 12) and torch.equal(ids[0], trained.encode([CAPTIONS[0]])[0])
    assert ids[0, 10:].tolist() == [0, 0]  # 10 tokens, then [PAD]
    assert 1 in ids[1].tolist()  # "z" is in no caption: [UNK]
    restored = TextTokenizer.from_state(trained.state_dict())
    assert torch.equal(restored.encode(CAPTIONS), trained.encode(CAPTIONS))


def test_bpe_dropout_applies_to_training_captions_only():
    trained = TextTokenizer.train(CAPTIONS * 5, vocab_size=300, context_length=12)
    dropped = TextTokenizer(trained.serialized, context_length=12, dropout=0.999)
    assert torch.equal(dropped.encode(CAPTIONS), trained.encode(CAPTIONS))
    pieces = dropped.encode(["background"], training=True)[0]
    assert (pieces != 0).sum() > 1 and (trained.encode(["background"])[0] != 0).sum() == 1


def test_prompts_longer_than_the_context_are_truncated_with_a_note(capsys):
    tokenizer = TextTokenizer.train(CAPTIONS * 5, vocab_size=300, context_length=4)
    ids = prompt_ids(tokenizer, CAPTIONS[:2], ["--prompt 1", "--prompt 2"])
    assert ids.shape == (2, 4) and (ids != 0).all()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "note: --prompt 1 has 10 text tokens; the prior reads the first 4 ('a red star on')"
    assert len(out) == 2


@pytest.mark.parametrize("prompt", ["", "  \t\n ", "\u200b"])
def test_an_empty_prompt_is_refused(prompt):
    tokenizer = TextTokenizer.train(CAPTIONS, vocab_size=300, context_length=8)
    with pytest.raises(DataError, match="--prompt 2: the prompt .* is empty"):
        prompt_ids(tokenizer, [CAPTIONS[0], prompt], ["--prompt 1", "--prompt 2"])


def test_a_vocabulary_of_another_size_than_the_prior_is_refused():
    tokenizer = TextTokenizer.train(CAPTIONS, vocab_size=300, context_length=8)
    with pytest.raises(ConfigError, match=f"has {tokenizer.vocab_size} tokens and a context of 8, the prior reads "
                                          "16384 tokens and a context of 8"):
        tokenizer.check_fits(16384, 8, "cc3m/stage2/model.pt")


def test_a_missing_vocabulary_file_names_it_and_where_it_is_published(tmp_path):
    with pytest.raises(WeightsError) as error:
        TextTokenizer.official("bpe16k_huggingface", str(tmp_path), "--text-tokenizer", context_length=32)
    message = str(error.value)
    assert "bpe-16k-vocab.json" in message and "--text-tokenizer" in message
    assert "rqvae/txtimg_datasets/tokenizers/pretrained/" in message and "\n" not in message
