"""Extracted codes on disk: fixed-size shards written atomically, read back as a training dataset.

A shard `codes_{k:05d}.npz` holds the codes of images [k * shard_size, (k + 1) * shard_size)
of a split: `codes` (N, A, *code_shape) with A augmentations per image (1, or 2 with the
horizontal flip), `labels` (N,), `indices` (N,). Shard k is written by rank k % world_size, so an
interrupted extraction resumes by skipping finished shards, whatever the number of processes.
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from common.config import Field
from common.errors import DataError

CODES_SCHEMA = {  # the `codes` section of a prior's config
    "train": Field(str, None, doc="folder of code shards from scripts/extract_codes.py to train on instead of images"),
    "val": Field(str, None),
}


def shard_path(directory: str, shard: int) -> str:
    return os.path.join(directory, f"codes_{shard:05d}.npz")


def write_shard(directory: str, shard: int, codes: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    """Write one shard atomically (temporary file, then rename)."""
    os.makedirs(directory, exist_ok=True)
    path = shard_path(directory, shard)
    tmp = f"{path}.tmp.npz"
    dtype = np.int16 if codes.max(initial=0) < 2**15 else np.int32
    np.savez(tmp, codes=codes.astype(dtype), labels=labels.astype(np.int64), indices=indices.astype(np.int64))
    os.replace(tmp, path)


def write_meta(directory: str, meta: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)


def read_meta(directory: str) -> dict:
    path = os.path.join(directory, "meta.json")
    if not os.path.isfile(path):
        raise DataError(f"{directory}: no meta.json; extract codes with scripts/extract_codes.py first")
    with open(path) as f:
        return json.load(f)


class CodesDataset(Dataset):
    """Codes of a split, all shards in memory; each item picks one of its stored augmentations.

    The augmentation of item i in epoch e is drawn from a generator seeded by (seed, e, i), so it does
    not depend on workers or processes and a resumed run sees the same data.
    """

    def __init__(self, directory: str, seed: int = 0):
        self.meta = read_meta(directory)
        paths = sorted(glob.glob(os.path.join(directory, "codes_*.npz")))
        expected = self.meta["num_shards"]
        if len(paths) != expected:
            raise DataError(f"{directory}: {len(paths)} of {expected} code shards present; "
                            "finish the extraction (rerun scripts/extract_codes.py, it resumes)")
        shards = [np.load(p) for p in paths]
        self.codes = torch.from_numpy(np.concatenate([s["codes"] for s in shards]))
        self.labels = torch.from_numpy(np.concatenate([s["labels"] for s in shards]))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.codes.shape[0]

    def __getitem__(self, index: int) -> dict:
        num_aug = self.codes.shape[1]
        choice = 0
        if num_aug > 1:
            generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) % 2**63)
            choice = int(torch.randint(num_aug, (), generator=generator))
        return {"codes": self.codes[index, choice].long(), "label": int(self.labels[index]), "skipped": 0}
