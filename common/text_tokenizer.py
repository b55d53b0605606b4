"""The text tokenizer of text-conditioned priors: the official RQ-Transformer CharBPE, through `tokenizers`.

Set up as the official CC-3M / COCO datasets and T2I notebook set it up: the package's
`CharBPETokenizer` from a vocabulary and a merges file (`[UNK]` for unknown characters, BERT
normaliser without accent stripping followed by lower-casing, BERT pre-tokenizer, `</w>` at word
ends), `[PAD]` (id 0) as the one added token, right padding and truncation to `context_length`.
There is no BOS or EOS and no attention mask: pads are ordinary tokens the prior reads, and the
empty caption is all pads. BPE dropout applies to training batches only.

Captions with no released vocabulary (the built-in shapes) get one trained by the same package.
A tokenizer travels in our checkpoints as the package's JSON (`state_dict`), so a run's checkpoint
alone turns prompts into tokens.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

import torch
from tokenizers import CharBPETokenizer, Tokenizer

from common.errors import ConfigError, DataError
from common.weights import find_weights

PAD, UNK = "[PAD]", "[UNK]"
# dataset.txt_tok_name of the released vocabularies -> (vocabulary, merges) file names
OFFICIAL_FILES = {"bpe16k_huggingface": ("bpe-16k-vocab.json", "bpe-16k-merges.txt"),
                  "bpe30k_huggingface": ("bpe-30k-vocab.json", "bpe-30k-merges.txt")}
TRAINED = "bpe_from_captions"  # ours: a vocabulary trained on the run's own captions
TOKENIZER_NAMES = (*OFFICIAL_FILES, TRAINED)
DEFAULT_NAME = "bpe16k_huggingface"  # the CC-3M release's
NAMED_NOTES = 5  # truncated prompts named one by one; the rest are counted
PUBLISHED_AT = ("the official repository kakaobrain/rq-vae-transformer, folder rqvae/txtimg_datasets/tokenizers/"
                "pretrained/ (https://github.com/kakaobrain/rq-vae-transformer/tree/main/rqvae/txtimg_datasets/"
                "tokenizers/pretrained)")


class TextTokenizer:
    """Captions -> int64 token ids (B, context_length), as the official text datasets make them."""

    def __init__(self, serialized: str, context_length: int, dropout: float = 0.0):
        if context_length < 2:
            raise ConfigError(f"the text context length must be at least 2 tokens, got {context_length}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dataset.bpe_dropout must be in [0, 1), got {dropout}")
        self.serialized, self.context_length, self.dropout = serialized, context_length, dropout
        self.tokenizer = _with_length(Tokenizer.from_str(serialized), context_length)
        self.training_tokenizer = self.tokenizer
        if dropout > 0:
            data = json.loads(serialized)
            data["model"]["dropout"] = dropout
            self.training_tokenizer = _with_length(Tokenizer.from_str(json.dumps(data)), context_length)

    # -- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_files(cls, vocab: str, merges: str, context_length: int, dropout: float = 0.0) -> "TextTokenizer":
        """The official set-up on a vocabulary (.json) and merges (.txt) file."""
        try:
            tokenizer = CharBPETokenizer.from_file(vocab, merges, unk_token=UNK, lowercase=True)
        except Exception as error:  # noqa: BLE001 - the package reports malformed files with its own exceptions
            raise DataError(f"{vocab} / {merges}: not a BPE vocabulary and merges file pair ({error})") from None
        tokenizer.add_special_tokens([PAD])
        if tokenizer.token_to_id(PAD) != 0:
            raise DataError(f"{vocab}: {PAD} must be token 0, as in the released vocabularies")
        return cls(tokenizer.to_str(), context_length, dropout)

    @classmethod
    def official(cls, name: str, folder: str | None, flag: str, context_length: int,
                 dropout: float = 0.0) -> "TextTokenizer":
        """A released vocabulary by its `txt_tok_name`, from `folder` (given by `flag`) or torch's hub cache."""
        if name not in OFFICIAL_FILES:
            raise ConfigError(f"dataset.txt_tok_name {name!r} has no released vocabulary here; choose one of "
                              f"{', '.join(OFFICIAL_FILES)} (or {TRAINED} to train one on the captions)")
        vocab, merges = (find_weights(filename, os.path.join(folder, filename) if folder else None, PUBLISHED_AT,
                                      flag) for filename in OFFICIAL_FILES[name])
        return cls.from_files(vocab, merges, context_length, dropout)

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int, context_length: int,
              dropout: float = 0.0) -> "TextTokenizer":
        """A CharBPE vocabulary of at most `vocab_size` entries learnt from `captions`, [PAD] 0 and [UNK] 1.

        Without the `</w>` word-end mark: the package's trainer numbers the marked characters in a different
        order in every process, and unmarked the same captions always give the same vocabulary."""
        tokenizer = CharBPETokenizer(unk_token=UNK, lowercase=True, suffix="")
        tokenizer.train_from_iterator(captions, vocab_size=vocab_size, min_frequency=1, special_tokens=[PAD, UNK],
                                      suffix="", show_progress=False)
        return cls(tokenizer.to_str(), context_length, dropout)

    # -- checkpoints ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"tokenizer": self.serialized, "context_length": self.context_length, "dropout": self.dropout}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.__init__(state["tokenizer"], int(state["context_length"]), float(state["dropout"]))

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "TextTokenizer":
        return cls(state["tokenizer"], int(state["context_length"]), float(state["dropout"]))

    # -- use ------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: Sequence[str], training: bool = False) -> torch.Tensor:
        """Token ids (B, context_length) int64; BPE dropout only when `training`."""
        tokenizer = self.training_tokenizer if training else self.tokenizer
        return torch.tensor([tokenizer.encode(text).ids for text in texts], dtype=torch.long)

    def count(self, text: str) -> tuple[list[str], int]:
        """(the token strings the prior reads, the number of text tokens before truncation) of `text`."""
        encoding = self.tokenizer.encode(text)
        pieces = [encoding, *encoding.overflowing]
        kept = [token for token, real in zip(encoding.tokens, encoding.attention_mask) if real]
        return kept, sum(sum(piece.attention_mask) for piece in pieces)

    def check_fits(self, vocab_size: int, context_length: int, source: str) -> None:
        """Refuse a tokenizer whose vocabulary or context length is not the prior's."""
        if (self.vocab_size, self.context_length) != (vocab_size, context_length):
            raise ConfigError(f"{source}: the text tokenizer has {self.vocab_size} tokens and a context of "
                              f"{self.context_length}, the prior reads {vocab_size} tokens and a context of "
                              f"{context_length}; use the vocabulary the prior was made for")


def _with_length(tokenizer: Tokenizer, context_length: int) -> Tokenizer:
    tokenizer.enable_padding(length=context_length, pad_id=0, pad_token=PAD)
    tokenizer.enable_truncation(max_length=context_length)
    return tokenizer


def prompt_ids(tokenizer: TextTokenizer, prompts: Sequence[str], names: Sequence[str],
               notes: bool = True) -> torch.Tensor:
    """Token ids (N, context_length) of prompts (`names[i]` says where prompt i came from, for messages).

    A prompt with no text token is refused. A prompt longer than the context is truncated, as officially; with
    `notes` the first few are named (with the tokens kept), the rest counted."""
    truncated = []
    for prompt, name in zip(prompts, names):
        kept, count = tokenizer.count(prompt)
        if not count:
            raise DataError(f"{name}: the prompt {prompt!r} is empty (no text tokens); give a caption")
        if count > tokenizer.context_length:
            truncated.append(f"{name} has {count} text tokens; the prior reads the first {tokenizer.context_length} "
                             f"({' '.join(token.replace('</w>', '') for token in kept)!r})")
    if notes:
        for note in truncated[:NAMED_NOTES]:
            print(f"note: {note}")
        if len(truncated) > NAMED_NOTES:
            print(f"note: {len(truncated) - NAMED_NOTES} more of the {len(prompts)} prompts are truncated to "
                  f"{tokenizer.context_length} text tokens")
    return tokenizer.encode(prompts)


def text_tokenizer_for(prior: Any, config: Mapping[str, Any], folder: str | None, source: str) -> TextTokenizer:
    """The text tokenizer of a text prior: the one it was loaded with (our checkpoints carry theirs), else the
    released vocabulary its config names (`dataset.txt_tok_name`), found in `folder` (--text-tokenizer), the
    config's `dataset.txt_tok_path` or torch's hub cache; refused when it does not fit the prior."""
    tokenizer = prior.text_tokenizer
    if tokenizer is None:
        dataset = config.get("dataset") or {}
        tokenizer = TextTokenizer.official(dataset.get("txt_tok_name") or DEFAULT_NAME,
                                           folder or dataset.get("txt_tok_path"), "--text-tokenizer",
                                           prior.context_length)
    tokenizer.check_fits(prior.text_vocab_size, prior.context_length, source)
    return tokenizer
