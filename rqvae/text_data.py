"""The text side of a text-to-image RQ-Transformer run: the official CC-3M `dataset` keys and the run's text tokenizer.

The official CC-3M config names its data `dataset.dataset: cc3m`, `image_resolution: 256` and
`transforms: dalle-vqvae` (a string), and its captions `txt_tok_name`, `context_length`,
`bpe_dropout`; `dataset_section` reads them in the terms of the shared data module (common/data.py).
The tokenizer of a run is the released vocabulary `txt_tok_name` names (found in `dataset.txt_tok_path`
or torch's hub cache), or, with `txt_tok_name: bpe_from_captions`, a vocabulary of `vocab_size_txt`
entries trained on the training captions in seconds; either way it is saved in every checkpoint.
"""
from __future__ import annotations

from typing import Any, Mapping

from common.config import Config, Field, validate
from common.data import CAPTION_TYPES, DATASET_SCHEMA, caption_list
from common.dist import DistEnv, broadcast_object
from common.errors import ConfigError
from common.text_tokenizer import DEFAULT_NAME, OFFICIAL_FILES, TOKENIZER_NAMES, TRAINED, TextTokenizer

TEXT_DATASET_KEYS = {
    "dataset": Field(str, None, doc="official text configs: the dataset type (cc3m), read as dataset.type"),
    "image_resolution": Field(int, None, minimum=1,
                              doc="official text configs: the image side, read as dataset.resolution"),
    "txt_tok_name": Field(str, None, choices=TOKENIZER_NAMES,
                          doc=f"text vocabulary: {', '.join(OFFICIAL_FILES)} (released files; default "
                              f"{DEFAULT_NAME}) or {TRAINED} (trained on the training captions)"),
    "txt_tok_path": Field(str, None, doc="ours: the folder holding the released vocabulary files "
                                         "(default: torch's hub cache)"),
    "vocab_size_txt": Field(int, None, minimum=3,
                            doc=f"{TRAINED}: the size of the vocabulary to train (official configs: unused)"),
    "context_length": Field(int, None, minimum=2,
                            doc="text tokens per caption; must equal arch.block_size_cond (default: it)"),
    "bpe_dropout": Field(float, 0.0, doc="BPE dropout on training captions (official CC-3M: 0.1)"),
}

# The `dataset` section of a stage-2 config as written: the shared keys, the text keys, and the official text
# configs' forms of `type` (absent) and `transforms` (a string), which `dataset_section` turns into ours.
STAGE2_DATASET = {
    **DATASET_SCHEMA, **TEXT_DATASET_KEYS,
    "type": Field(str, None, doc=DATASET_SCHEMA["type"].doc + " (official text configs: dataset.dataset)"),
    "transforms": Field(object, None, doc="{type: NAME}, or NAME as official text configs write it"),
}


def dataset_section(config: Mapping[str, Any], source: str) -> Config:
    """The stage-2 `dataset` section in the shared data module's terms, checked; for a text model (arch.block_size_cond
    > 1) it must give captions, and its context_length is the model's."""
    data = dict(config["dataset"])
    if data.get("type") is None:
        data["type"] = data.get("dataset")
    if data.get("resolution") is None:
        data["resolution"] = data.get("image_resolution")
    if isinstance(data.get("transforms"), str):
        data["transforms"] = {"type": data["transforms"]}
    elif data.get("transforms") is None:
        data.pop("transforms", None)
    if data["type"] is None:
        raise ConfigError(f"{source}: missing required key 'dataset.type'")
    section = validate(data, {**DATASET_SCHEMA, **TEXT_DATASET_KEYS}, source, prefix="dataset.")
    length = config["arch"]["block_size_cond"]
    if length <= 1:
        return section
    if section["type"].lower() not in CAPTION_TYPES and not section["captions"]:
        raise ConfigError(f"{source}: a text-to-image prior (arch.block_size_cond {length}) trains on captioned "
                          f"images, and dataset.type {section['type']} has none; use {', '.join(CAPTION_TYPES)}, or "
                          "shapes with dataset.captions=true")
    if section["txt_tok_name"] == TRAINED and not section["vocab_size_txt"]:
        raise ConfigError(f"{source}: dataset.txt_tok_name {TRAINED} needs dataset.vocab_size_txt, the size of the "
                          "vocabulary to train")
    if config["codes"]["train"]:
        raise ConfigError(f"{source}: codes.train: extracted codes carry no captions; a text-to-image prior trains "
                          "on the images of a caption dataset")
    if section["context_length"] is None:
        section["context_length"] = length
    if section["context_length"] != length:
        raise ConfigError(f"{source}: dataset.context_length {section['context_length']} must equal "
                          f"arch.block_size_cond {length} (the text tokens the prior reads)")
    return section


def run_text_tokenizer(config: Config, env: DistEnv) -> TextTokenizer:
    """The text tokenizer of a text-model run (BPE dropout `dataset.bpe_dropout` on training captions); an
    arch.vocab_size_cond of 0 becomes its vocabulary size, any other must equal it."""
    dataset, arch = config["dataset"], config["arch"]
    length, dropout = arch["block_size_cond"], dataset["bpe_dropout"]
    name = dataset["txt_tok_name"] or DEFAULT_NAME
    if name == TRAINED:
        trained = TextTokenizer.train(caption_list(dataset, "train"), dataset["vocab_size_txt"], length) \
            if env.is_main else None
        state = broadcast_object(trained.state_dict() if trained is not None else None)
        text = TextTokenizer(state["tokenizer"], length, dropout)
    else:
        text = TextTokenizer.official(name, dataset["txt_tok_path"], "dataset.txt_tok_path", length, dropout)
    if not arch["vocab_size_cond"]:
        arch["vocab_size_cond"] = text.vocab_size
    text.check_fits(arch["vocab_size_cond"], length, f"dataset.txt_tok_name {name}")
    return text
