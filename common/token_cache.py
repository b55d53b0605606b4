"""Cached tokens on disk: fixed-size shards written atomically, read back as a training dataset.

A shard `codes_{k:05d}.npz` holds the tokens of images [k * shard_size, (k + 1) * shard_size)
of a split, with A augmentations per image (1, 2 with the horizontal flip, 10 with the ten-crop),
`labels` (N,) and `indices` (N,). The tokens are, by the tokenizer's kind:

- discrete: `codes` (N, A, *code_shape), int16 or int32 (whichever holds the vocabulary);
- continuous: `moments` (N, A, 2C, h, w), float32, the posterior of each image: training draws a
  fresh sample of it at every step, so the cache does not fix one sample per image.

Shard k is written by rank k % world_size, so an interrupted extraction resumes by skipping
finished shards, whatever the number of processes. The dataset keeps the stored dtype (codes
become int64 indices, moments stay float32).
"""
from __future__ import annotations

import glob
import json
import os
import zipfile

import numpy as np
import torch
from torch.utils.data import Dataset

from common.config import Field
from common.errors import DataError, first_line

CODES_SCHEMA = {  # the `codes` section of a prior's config
    "train": Field(str, None, doc="folder of token shards from scripts/extract_codes.py (or of LlamaGen's code "
                                  "files, see common/llamagen_codes.py) to train on instead of images"),
    "val": Field(str, None),
}
TOKENIZER_SCHEMA = {  # the `tokenizer` section of a prior's config
    "ckpt": Field(str, None, doc="the tokenizer checkpoint (ours or official) whose tokens are modelled"),
}
EXTRACT_AGAIN = "extract the codes again with scripts/extract_codes.py"


def pick_augmentation(num_aug: int, seed: int, epoch: int, index: int) -> int:
    """Which of item `index`'s `num_aug` stored augmentations epoch `epoch` trains on: drawn from a generator
    seeded by (seed, epoch, index), so it depends on neither workers nor processes and a resumed run sees the same."""
    if num_aug == 1:
        return 0
    generator = torch.Generator().manual_seed(hash((seed, epoch, index)) % 2**63)
    return int(torch.randint(num_aug, (), generator=generator))


def shard_path(directory: str, shard: int) -> str:
    return os.path.join(directory, f"codes_{shard:05d}.npz")


def write_shard(directory: str, shard: int, tokens: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    """Write one shard atomically (temporary file, then rename): integer tokens as `codes`, float ones as
    `moments` (float32)."""
    os.makedirs(directory, exist_ok=True)
    path = shard_path(directory, shard)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.npz")  # hidden: never globbed as a shard
    if np.issubdtype(tokens.dtype, np.floating):
        stored = {"moments": tokens.astype(np.float32)}
    else:
        stored = {"codes": tokens.astype(np.int16 if tokens.max(initial=0) < 2**15 else np.int32)}
    np.savez(tmp, **stored, labels=labels.astype(np.int64), indices=indices.astype(np.int64))
    os.replace(tmp, path)


def write_meta(directory: str, meta: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)


def read_meta(directory: str) -> dict:
    path = os.path.join(directory, "meta.json")
    if not os.path.isfile(path):
        raise DataError(f"{directory}: no meta.json; extract codes with scripts/extract_codes.py first")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({first_line(error)}); {EXTRACT_AGAIN}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("num_shards"), int):
        raise DataError(f"{path}: malformed, it has no num_shards count; {EXTRACT_AGAIN}")
    return meta


def read_shard(path: str) -> dict[str, np.ndarray]:
    """The arrays of one shard, read whole; a damaged or foreign file is a DataError naming it."""
    try:
        archive = np.load(path)  # allow_pickle stays off: a shard is data, never code
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive")
        with archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{path}: damaged code shard ({first_line(error)}); delete it and rerun "
                        "scripts/extract_codes.py (it resumes)") from None
    if "labels" not in arrays or not {"codes", "moments"} & set(arrays):
        raise DataError(f"{path}: not a code shard (it holds {sorted(arrays)}, not codes or moments and labels); "
                        f"{EXTRACT_AGAIN}")
    return arrays


def check_shards_agree(paths: list[str], shards: list[dict[str, np.ndarray]], key: str) -> None:
    """Every shard holds `key` tokens of the first shard's per-image shape and one label per image; the first that
    does not is named."""
    first = shards[0][key].shape[1:]
    for path, shard in zip(paths, shards):
        tokens = shard.get(key)
        if tokens is None or tokens.shape[1:] != first:
            found = f"{key} of shape {list(tokens.shape[1:])}" if tokens is not None else f"no {key}"
            raise DataError(f"{path}: {found} per image, but {paths[0]} has {list(first)}; a code folder must hold "
                            f"one extraction, {EXTRACT_AGAIN}")
        if len(shard["labels"]) != len(tokens):
            raise DataError(f"{path}: {len(shard['labels'])} labels for {len(tokens)} images; {EXTRACT_AGAIN}")


class CachedTokens(Dataset):
    """Tokens of a split, all shards in memory; each item picks one of its stored augmentations.

    The augmentation of item i in epoch e is `pick_augmentation(A, seed, e, i)`. Items are
    `{"codes": int64 (*code_shape)}` or `{"moments": float32 (2C, h, w)}`, with "label" and "skipped".
    """

    def __init__(self, directory: str, seed: int = 0):
        self.directory = directory
        self.meta = read_meta(directory)
        paths = sorted(glob.glob(os.path.join(directory, "codes_*.npz")))
        expected = self.meta["num_shards"]
        if len(paths) != expected:
            raise DataError(f"{directory}: {len(paths)} of {expected} code shards present; "
                            "finish the extraction (rerun scripts/extract_codes.py, it resumes)")
        shards = [read_shard(p) for p in paths]
        self.key = "moments" if "moments" in shards[0] else "codes"
        check_shards_agree(paths, shards, self.key)
        try:
            self.tokens = torch.from_numpy(np.concatenate([s[self.key] for s in shards]))
            self.labels = torch.from_numpy(np.concatenate([s["labels"] for s in shards]))
        except (KeyError, ValueError) as error:
            raise DataError(f"{directory}: the shards do not fit together ({first_line(error)}); "
                            f"{EXTRACT_AGAIN}") from None
        self.seed = seed
        self.epoch = 0

    def check_tokenizer(self, tokenizer: torch.nn.Module) -> None:
        """Refuse tokens another tokenizer made: kind, shape and (codes) vocabulary must be the given one's.
        One scan of the cache at load time, instead of a check on every training batch."""
        if tokenizer.kind == "discrete":
            stored, wanted = tuple(self.tokens.shape[2:]), tuple(tokenizer.code_shape)
            fits = self.key == "codes" and stored == wanted and (
                self.tokens.numel() == 0 or (int(self.tokens.min()) >= 0 and int(self.tokens.max()) < tokenizer.vocab_size))
            what = f"codes of shape {list(wanted)} in [0, {tokenizer.vocab_size})"
        else:
            channels, h, w = tokenizer.token_shape
            stored, wanted = tuple(self.tokens.shape[2:]), (2 * channels, h, w)
            fits = self.key == "moments" and stored == wanted
            what = f"posterior moments of shape {list(wanted)}"
        if not fits:
            raise DataError(f"{self.directory}: the cached {self.key} (shape {list(stored)}) are not what the "
                            f"tokenizer makes ({what}); extract them again with this tokenizer")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> dict:
        tokens = self.tokens[index, pick_augmentation(self.tokens.shape[1], self.seed, self.epoch, index)]
        return {self.key: tokens.long() if self.key == "codes" else tokens, "label": int(self.labels[index]),
                "skipped": 0}
