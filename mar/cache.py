"""MAR's latent cache in the official layout: writing it, and the dataset that trains from it.

One file per training image, `<cached_path>/<class folder>/<image file name>.npz`, holding
`moments` and `moments_flip`: the KL-VAE's posterior moments (2C, h, w), float32, of the
centre-cropped image and of its mirror image (raw `quant_conv` output, log-variance unclamped).
Labels are not stored: they are the positions of the class folders in sorted order, as for the
image folders the cache was made from, so images and cache agree on every label.

Writing skips the files already there (a rerun resumes), writes each file whole or not at all
(temporary file, then rename), and splits the remaining images between the torchrun processes.
Training draws a fresh posterior sample from the moments at every step, so the cache does not fix
one sample per image.
"""
from __future__ import annotations

import glob
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from common import dist
from common.data import ShapesDataset, build_transform, class_folders, derive_seed, imagenet_files
from common.errors import DataError
from common.tokenizer import ContinuousTokenizer

CACHE_KEYS = ("moments", "moments_flip")
SUFFIX = ".npz"
_PARTIAL = ".npz.tmp"  # a file being written: invisible to readers and to the resume scan


# ----------------------------------------------------------------------------------------------
# The images to cache
# ----------------------------------------------------------------------------------------------

class UnreadableImageSkipped(UserWarning):
    """An image file could not be decoded; it gets no cache file (a rerun tries it again)."""


class ImagesToCache(Dataset):
    """Images in the cache-time form, each with the name of its cache file relative to the cache
    folder (without `.npz`). Items `{"image": (3, S, S) in [-1, 1], "index": int, "readable": 0 or 1}`;
    an unreadable image comes as zeros with "readable" 0, so a batch never fails."""

    def __init__(self, names: list[str], img_size: int):
        self.names, self.img_size = names, img_size

    def __len__(self) -> int:
        return len(self.names)

    def read(self, index: int) -> torch.Tensor | None:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        image = self.read(index)
        if image is None:
            return {"image": torch.zeros(3, self.img_size, self.img_size), "index": index, "readable": 0}
        return {"image": image, "index": index, "readable": 1}


class FolderImages(ImagesToCache):
    """`<data_path>/train/<class>/<images>`, ADM's centre crop to `img_size` and no flip (the flipped
    copy is cached beside each image); cache names `<class>/<file name>`."""

    def __init__(self, data_path: str, img_size: int):
        train = os.path.join(data_path, "train")
        if not os.path.isdir(train):
            raise DataError(f"--data_path {data_path}: no folder {train}; the training images go in "
                            f"{train}/<class>/<image>, as ImageNet's")
        self.paths, _ = imagenet_files(data_path, "train")  # refuses a folder without class folders or images
        super().__init__([os.path.relpath(p, train) for p in self.paths], img_size)
        self.transform = build_transform("center_crop", img_size, train=False)

    def read(self, index: int) -> torch.Tensor | None:
        try:
            with Image.open(self.paths[index]) as image:
                picture = image.convert("RGB")
        except Exception as error:  # noqa: BLE001 - PIL signals bad files with many exception types
            warnings.warn(f"{self.paths[index]}: cannot read image ({type(error).__name__}: {error}); not cached",
                          UnreadableImageSkipped, stacklevel=2)
            return None
        return self.transform(picture)


class ShapeImages(ImagesToCache):
    """The built-in shapes (train split) drawn at `img_size`; cache names `<label:02d>_<shape>/<index:06d>`,
    so that the sorted class folders give back the dataset's labels."""

    def __init__(self, img_size: int, num_images: int | None = None, seed: int = 0):
        self.shapes = ShapesDataset("train", img_size, num_images, seed)
        classes = [f"{label:02d}_{name}" for label, name in enumerate(ShapesDataset.class_names)]
        super().__init__([os.path.join(classes[i % len(classes)], f"{i:06d}") for i in range(len(self.shapes))],
                         img_size)

    def read(self, index: int) -> torch.Tensor | None:
        return self.shapes[index]["image"]


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CacheReport:
    """Counts over all processes: files written now, files found from an earlier run, images skipped."""

    written: int
    existing: int
    unreadable: int


def cache_file(cached_path: str, name: str) -> str:
    return os.path.join(cached_path, name + SUFFIX)


def write_moments(path: str, moments: np.ndarray, moments_flip: np.ndarray) -> None:
    """One cache file, atomically: a crash leaves a `.npz.tmp*` file, never a truncated `.npz`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.tmp{os.getpid()}"
    with open(partial, "wb") as f:  # a file object: np.savez would append `.npz` to a name
        np.savez(f, moments=moments.astype(np.float32), moments_flip=moments_flip.astype(np.float32))
    os.replace(partial, path)


def missing_files(images: ImagesToCache, cached_path: str) -> list[int]:
    """Indices of the images without a cache file. Removes the partial files of an interrupted run."""
    present = set()
    for directory, _, files in os.walk(cached_path, followlinks=True):
        for name in files:
            path = os.path.join(directory, name)
            if name.endswith(SUFFIX):
                present.add(os.path.relpath(path, cached_path)[:-len(SUFFIX)])
            elif _PARTIAL in name:
                os.remove(path)
    return [i for i, name in enumerate(images.names) if name not in present]


@torch.no_grad()
def cache_latents(vae: ContinuousTokenizer, images: ImagesToCache, cached_path: str, batch_size: int,
                  device: torch.device, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                  pin_memory: bool = False) -> CacheReport:
    """Write the cache files of `images` that are missing; every process calls this with its rank.

    Rank 0 lists what is missing before anyone writes and shares the list, so the processes split
    the same list into disjoint interleaved parts however many files an earlier run left.
    """
    todo = dist.broadcast_object(missing_files(images, cached_path) if rank == 0 else None)
    mine = todo[rank::world_size]
    loader = DataLoader(Subset(images, mine), batch_size=batch_size, num_workers=num_workers,
                        pin_memory=pin_memory)
    written = unreadable = 0
    for batch in tqdm(loader, desc="caching latents", disable=rank != 0):
        readable = batch["readable"].bool()
        unreadable += int((~readable).sum())
        if not readable.any():
            continue
        x = batch["image"][readable].to(device, non_blocking=True)
        moments = vae.encode_moments(x).float().cpu().numpy()  # (B, 2C, h, w)
        moments_flip = vae.encode_moments(x.flip(-1)).float().cpu().numpy()  # the mirror image's
        for index, m, m_flip in zip(batch["index"][readable].tolist(), moments, moments_flip):
            write_moments(cache_file(cached_path, images.names[index]), m, m_flip)
            written += 1
    counts = dist.all_reduce_sum(torch.tensor([written, unreadable]))
    return CacheReport(written=int(counts[0]), existing=len(images) - len(todo), unreadable=int(counts[1]))


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

class UnreadableLatentsWarning(UserWarning):
    """A cache file could not be read; a neighbouring file was used in its place."""


def npz_files(folder: str) -> list[str]:
    """Every `.npz` under `folder` (recursive), sorted by path."""
    return sorted(glob.glob(os.path.join(glob.escape(folder), "**", "*" + SUFFIX), recursive=True))


def read_moments(path: str, key: str) -> np.ndarray:
    """The array `key` of a cache file; raises for a damaged file or one without both keys."""
    with np.load(path) as data:  # allow_pickle stays off: a cache file is data, never code
        missing = [k for k in CACHE_KEYS if k not in data.files]
        if missing:
            raise KeyError(f"no {', '.join(missing)}")
        moments = data[key]
    if moments.ndim != 3 or not np.issubdtype(moments.dtype, np.floating):
        raise ValueError(f"{key} is {moments.dtype} {moments.shape}, not float (2C, h, w)")
    return moments


class CachedLatents(Dataset):
    """The latent cache as a training set: items `{"moments": float32 (2C, h, w), "label": int, "skipped": 0 or 1}`.

    Labels: class folders sorted -> 0..K-1 (as torchvision's ImageFolder and the official loader).
    Each item is `moments` or `moments_flip` with probability 1/2, drawn from a generator seeded by
    (seed, epoch, index): the same choice whatever the DataLoader workers or processes, so a resumed
    run sees the same data. Call `set_epoch` before each epoch.
    A file that cannot be read (or holds another shape than the cache's first file) is reported once
    (UnreadableLatentsWarning) and the next readable index (wrapping) is returned in its place with
    "skipped" 1, so summing "skipped" counts them while batches keep their size.
    """

    def __init__(self, cached_path: str, seed: int = 0):
        if not os.path.isdir(cached_path):
            raise DataError(f"{cached_path}: no folder of cached latents; write it with main_cache.py")
        self.root, self.seed, self.epoch = cached_path, seed, 0
        self.classes = class_folders(cached_path)
        if not self.classes:
            raise DataError(f"{cached_path}: no class folders of cached latents (<class>/<image>.npz); "
                            "write them with main_cache.py")
        self.class_to_idx = {name: label for label, name in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            files = npz_files(os.path.join(cached_path, name))
            if not files:
                raise DataError(f"{os.path.join(cached_path, name)}: a class folder without .npz files; "
                                "finish the cache with main_cache.py (it resumes) or remove the folder")
            self.samples += [(path, label) for path in files]
        self.targets = [label for _, label in self.samples]
        self.unreadable: set[int] = set()  # per process: each DataLoader worker learns on its own
        self.moments_shape = self._first_shape()

    def _first_shape(self) -> tuple[int, ...]:
        """The (2C, h, w) of the first readable file: every file must have it."""
        for path, _ in self.samples:
            try:
                return tuple(read_moments(path, "moments").shape)
            except Exception:  # noqa: BLE001 - damaged files are skipped here as in __getitem__
                continue
        raise DataError(f"{self.root}: none of the {len(self.samples)} cache files can be read; "
                        "write the cache again with main_cache.py")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def check_tokenizer(self, tokenizer: ContinuousTokenizer) -> None:
        """Refuse moments of another latent width than the tokenizer's (2C channels)."""
        if self.moments_shape[0] != 2 * tokenizer.channels:
            raise DataError(f"{self.root}: the cached moments have {self.moments_shape[0]} channels, the tokenizer's "
                            f"{2 * tokenizer.channels} (2 x {tokenizer.channels} latent channels); cache the latents "
                            "again with this VAE")

    def set_epoch(self, epoch: int) -> None:
        """Call before building the epoch's DataLoader (workers copy the dataset when they start)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def uses_flip(self, index: int) -> bool:
        """Whether item `index` is `moments_flip` in the current epoch."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, index))
        return bool(torch.rand((), generator=generator) >= 0.5)  # the official loader: moments when rand < 0.5

    def load(self, index: int, key: str) -> torch.Tensor | None:
        """The array `key` of file `index`, or None (with a warning the first time) if it cannot be read."""
        if index in self.unreadable:
            return None
        path = self.samples[index][0]
        try:
            moments = read_moments(path, key)
            if moments.shape != self.moments_shape:
                raise ValueError(f"{key} has shape {moments.shape}, the cache's first file {self.moments_shape}")
        except Exception as error:  # noqa: BLE001 - numpy and zipfile signal damaged files with many types
            self.unreadable.add(index)
            warnings.warn(f"{path}: cannot read cached latents ({type(error).__name__}: {error}); using the next "
                          "file instead", UnreadableLatentsWarning, stacklevel=2)
            return None
        return torch.from_numpy(moments.astype(np.float32, copy=False))

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        key = CACHE_KEYS[self.uses_flip(index)]
        for offset in range(len(self)):
            position = (index + offset) % len(self)
            moments = self.load(position, key)
            if moments is not None:
                return {"moments": moments, "label": self.targets[position], "skipped": int(offset > 0)}
        raise DataError(f"none of the {len(self)} cache files under {self.root} can be read; "
                        "write the cache again with main_cache.py")
