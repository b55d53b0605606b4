"""LlamaGen's code files (`extract_codes_c2i.py`): one `.npy` per image, written and read back for training.

A code folder `<name>_codes/` holds `{i}.npy`, int64 (1, A, h*w): the codes of A views of image i
(A = 10 with the ten-crop, 2 for the centre crop and its mirror), and its sibling `<name>_labels/`
holds `{i}.npy`, int64 (1,). `<name>` is `{dataset}{image_size}` (`imagenet256`), as officially.
Each training item picks one of its A views, drawn like the views of our token shards
(common/token_cache.py). As LlamaGen's loader, a second extraction in the sibling folder whose path
has `ten_crop_105/` in place of `ten_crop/` doubles the views (each one as likely).

Folders from the official script train here unchanged; files are checked once when opened
(same size, so the same shape, and a labels file for every codes file) and again when read.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from common.data import CenterCropArr, build_transform
from common.errors import DataError
from common.token_cache import CachedTokens, pick_augmentation

TEN_CROP_VIEWS = ("top-left", "top-right", "bottom-left", "bottom-right", "centre",
                  "mirrored top-left", "mirrored top-right", "mirrored bottom-left", "mirrored bottom-right",
                  "mirrored centre")  # torchvision TenCrop's order
_VOCAB_SAMPLE = 64  # files whose codes are checked against the vocabulary when the folder is opened


class ExtractionCrop:
    """LlamaGen's extraction transform: ADM's centre crop to `size` -> (3, size, size) in [-1, 1]; with
    `crop_range`, the centre crop to int(size * crop_range) cut into TEN_CROP_VIEWS -> (10, 3, size, size)."""

    def __init__(self, size: int, crop_range: float | None = None):
        if crop_range is not None and int(size * crop_range) < size:
            raise DataError(f"--crop-range {crop_range}: the ten crops of {size} px need a range of at least 1.0")
        self.crop = CenterCropArr(int(size * crop_range) if crop_range else size)
        self.ten_crop = T.TenCrop(size) if crop_range else None
        self.to_tensor = build_transform("none", size, train=False)

    def __call__(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        image = self.crop(Image.fromarray(image) if isinstance(image, np.ndarray) else image)
        if self.ten_crop is None:
            return self.to_tensor(image)
        return torch.stack([self.to_tensor(crop) for crop in self.ten_crop(image)])


class CodeFolders(NamedTuple):
    codes: str
    labels: str


def output_folders(output: str, name: str) -> CodeFolders:
    """Where the extraction of dataset `name` (`imagenet256`) goes: `<output>/<name>_codes` and `_labels`."""
    return CodeFolders(os.path.join(output, f"{name}_codes"), os.path.join(output, f"{name}_labels"))


def _index_of(name: str) -> int | None:
    """i for a file named `{i}.npy`, else None."""
    return int(name[:-4]) if name.endswith(".npy") and name[:-4].isdigit() else None


def _indices_in(folder: str) -> set[int]:
    if not os.path.isdir(folder):
        return set()
    return {i for i in map(_index_of, os.listdir(folder)) if i is not None}


def written_indices(folders: CodeFolders) -> set[int]:
    """Images whose codes and label are both written (so a rerun skips them)."""
    return _indices_in(folders.codes) & _indices_in(folders.labels)


def _save_atomically(path: str, array: np.ndarray) -> None:
    with open(f"{path}.tmp", "wb") as f:
        np.save(f, array)
    os.replace(f"{path}.tmp", path)


def write_image_codes(folders: CodeFolders, indices: np.ndarray, codes: np.ndarray, labels: np.ndarray) -> None:
    """Codes (N, A, h, w) and labels (N,) of images `indices`, one file per image, each written atomically
    (the label first: a codes file never lacks its label)."""
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
    flat = codes.reshape(codes.shape[0], 1, codes.shape[1], -1).astype(np.int64)  # (N, 1, A, h*w)
    for index, image_codes, label in zip(indices.tolist(), flat, labels.astype(np.int64)):
        _save_atomically(os.path.join(folders.labels, f"{index}.npy"), label.reshape(1))
        _save_atomically(os.path.join(folders.codes, f"{index}.npy"), image_codes)


def _labels_beside(codes: str) -> CodeFolders:
    return CodeFolders(codes, codes[: -len("codes")] + "labels")


def _is_codes_name(name: str) -> bool:
    return name == "codes" or name.endswith("_codes")


def find_folders(directory: str) -> CodeFolders | None:
    """The folders of a LlamaGen extraction: `directory` itself if it is a `*codes` folder with its `*labels`
    sibling, or the one `codes`/`labels` (or `<name>_codes`/`<name>_labels`) pair inside it; None otherwise."""
    path = os.path.normpath(directory)
    if not os.path.isdir(path):
        return None
    candidates = [path] if _is_codes_name(os.path.basename(path)) else []
    candidates += sorted(e.path for e in os.scandir(path) if e.is_dir() and _is_codes_name(e.name))
    pairs = [_labels_beside(codes) for codes in candidates]
    complete = [p for p in pairs if os.path.isdir(p.labels)]
    if len(complete) > 1:
        names = ", ".join(os.path.basename(p.codes) for p in complete)
        raise DataError(f"{directory}: holds several code folders ({names}); set codes.train to the one to train on")
    unlabelled = [p for p in pairs if p not in complete and _indices_in(p.codes)]
    if not complete and unlabelled:
        raise DataError(f"{unlabelled[0].codes}: no labels folder {unlabelled[0].labels} beside it; LlamaGen's code "
                        "files come with their labels (extract both)")
    return complete[0] if complete else None


def _indexed_files(folder: str) -> dict[int, os.DirEntry]:
    files = {}
    for entry in os.scandir(folder):
        index = _index_of(entry.name)
        if index is None and entry.name.endswith(".npy"):
            raise DataError(f"{entry.path}: not a code file of LlamaGen's layout ({{index}}.npy); move it out "
                            f"of {folder}")
        if index is not None:
            files[index] = entry
    if not files:
        raise DataError(f"{folder}: no code files ({{index}}.npy); extract codes with scripts/extract_codes.py "
                        "--layout llamagen")
    return files


def _shape(path: str) -> tuple[tuple[int, ...], np.dtype]:
    array = np.load(path, mmap_mode="r")  # reads the header only
    return array.shape, array.dtype


class LlamaGenCodes(Dataset):
    """A LlamaGen code folder as a training dataset: items `{"codes": int64 (side, side), "label", "skipped"}`."""

    def __init__(self, directory: str, seed: int = 0):
        folders = find_folders(directory)
        if folders is None:
            raise DataError(f"{directory}: no LlamaGen code folders (<name>_codes/ and <name>_labels/)")
        self.directory = directory
        sibling = CodeFolders(*(f.replace(f"ten_crop{os.sep}", f"ten_crop_105{os.sep}") for f in folders))
        self.sources = [folders] + ([sibling] if sibling != folders and all(map(os.path.isdir, sibling)) else [])
        files = [_indexed_files(source.codes) for source in self.sources]
        self.indices = sorted(files[0])
        for source, found in zip(self.sources, files):
            if set(found) != set(self.indices):
                raise DataError(f"{source.codes}: holds other images than {folders.codes} "
                                f"({len(found)} and {len(self.indices)} files); extract both for the same images")
            missing = sorted(set(found) - _indices_in(source.labels))
            if missing:
                raise DataError(f"{found[missing[0]].path}: no labels file {source.labels}{os.sep}{missing[0]}.npy "
                                f"({len(missing)} missing); rerun the extraction, it writes both")
        self.shape = self._check_shapes(files)
        self.vocab_size: int | None = None
        self.seed = seed
        self.epoch = 0

    def _check_shapes(self, files: list[dict[int, os.DirEntry]]) -> tuple[int, int, int]:
        """One shape (1, A, side * side) of integers for every file: the files of one extraction have one size."""
        first = files[0][self.indices[0]]
        shape, dtype = _shape(first.path)
        if len(shape) != 3 or shape[0] != 1 or not np.issubdtype(dtype, np.integer) \
                or int(np.sqrt(shape[2])) ** 2 != shape[2]:
            raise DataError(f"{first.path}: codes of shape {list(shape)} ({dtype}), not LlamaGen's int64 (1, views, "
                            "side * side)")
        size = first.stat().st_size
        for found in files:
            for entry in found.values():
                if entry.stat().st_size != size:
                    raise DataError(f"{entry.path}: codes of shape {list(_shape(entry.path)[0])}, but {first.path} has "
                                    f"{list(shape)}; a code folder must hold one extraction")
        return shape

    @property
    def side(self) -> int:
        return int(np.sqrt(self.shape[2]))

    def check_tokenizer(self, tokenizer: nn.Module, resolution: int | None) -> None:
        """The codes must be the tokenizer's: its grid at `resolution` (the extraction size, which the files do not
        record) and its codebook (checked on a sample of files here, on every file when it is read)."""
        shape = tuple(getattr(tokenizer, "code_shape", tokenizer.token_shape))
        if tokenizer.kind != "discrete" or len(shape) != 2:
            raise DataError(f"{self.directory}: LlamaGen code files hold a square grid of codes per image; the "
                            f"tokenizer makes {tokenizer.kind} tokens of shape {list(shape)}")
        side = resolution // tokenizer.downsample_factor if resolution else shape[0]
        if self.side != side:
            raise DataError(f"{self.directory}: {self.side}x{self.side} codes per image, the tokenizer makes "
                            f"{side}x{side} at dataset.resolution {resolution or tokenizer.image_size}; set "
                            "dataset.resolution to the extraction's image size")
        self.vocab_size = tokenizer.vocab_size
        sample = np.linspace(0, len(self.indices) - 1, min(_VOCAB_SAMPLE, len(self.indices))).round().astype(int)
        for position in sample.tolist():
            self._read(self.sources[0], self.indices[position])

    def _read(self, source: CodeFolders, index: int) -> np.ndarray:
        path = os.path.join(source.codes, f"{index}.npy")
        codes = np.load(path)
        if codes.shape != self.shape:
            raise DataError(f"{path}: codes of shape {list(codes.shape)}, the folder's are {list(self.shape)}; "
                            "a code folder must hold one extraction")
        if self.vocab_size is not None and codes.size and (codes.min() < 0 or codes.max() >= self.vocab_size):
            raise DataError(f"{path}: code {int(codes.max() if codes.max() >= self.vocab_size else codes.min())} is "
                            f"outside the tokenizer's {self.vocab_size}-entry codebook; pass the tokenizer these "
                            "codes were extracted with (-v)")
        return codes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        views = self.shape[1]
        choice = pick_augmentation(views * len(self.sources), self.seed, self.epoch, index)
        source, view = self.sources[choice // views], choice % views
        image = self.indices[index]
        codes = self._read(source, image)[0, view]
        label = np.load(os.path.join(source.labels, f"{image}.npy")).reshape(-1)
        return {"codes": torch.from_numpy(codes.astype(np.int64)).view(self.side, self.side), "label": int(label[0]),
                "skipped": 0}


def open_codes(directory: str, seed: int, tokenizer: nn.Module, resolution: int | None) -> Dataset:
    """The codes of `directory` as a training dataset, checked against the tokenizer once: token shards of
    scripts/extract_codes.py (meta.json) or LlamaGen's code files."""
    if not os.path.isfile(os.path.join(directory, "meta.json")) and find_folders(directory) is not None:
        codes = LlamaGenCodes(directory, seed)
        codes.check_tokenizer(tokenizer, resolution)
        return codes
    shards = CachedTokens(directory, seed)
    shards.check_tokenizer(tokenizer)
    return shards
