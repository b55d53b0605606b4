"""Image sets to score: a folder of images, or an ADM sample batch (`.npz`, `arr_0` uint8 N×H×W×3).

Both yield `{"image": uint8 (3, H, W), "resized": bool, "error": str}`: uint8 RGB is what
torch-fidelity's Inception takes (it does its own resize to 299). One set is scored at one
size, that of its first image; an image of another size is resized to it (PIL bicubic) and
flagged, so the caller can say how many were. An unreadable file is reported in "error"
rather than raised inside a DataLoader worker, where it would become a traceback.
"""
from __future__ import annotations

import io
import os
import struct
import zipfile

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset

from common.data import list_images
from common.errors import DataError
from common.metrics.fidelity import npz_keys

ZIP_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # signature ... file name length, extra field length


class FolderImages(Dataset):
    """Every image under a folder (recursive, sorted by path)."""

    def __init__(self, folder: str):
        self.paths = list_images(folder)
        if not self.paths:
            raise DataError(f"{folder}: no images (.png, .jpg, .jpeg, .bmp, .webp) in this folder")
        try:
            with Image.open(self.paths[0]) as first:
                self.size = first.size  # (W, H)
        except OSError as error:
            raise DataError(f"{self.paths[0]}: cannot read image ({error})") from None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        try:
            with Image.open(self.paths[index]) as file:
                image = file.convert("RGB")
        except OSError as error:
            blank = torch.zeros(3, self.size[1], self.size[0], dtype=torch.uint8)
            return {"image": blank, "resized": False, "error": f"{self.paths[index]}: cannot read image ({error})"}
        resized = image.size != self.size
        if resized:
            image = image.resize(self.size, Image.BICUBIC)
        return {"image": TF.pil_to_tensor(image), "resized": resized, "error": ""}


class NpzImages(Dataset):
    """The `arr_0` batch of an ADM-style `.npz`, memory-mapped when stored uncompressed (np.savez)."""

    def __init__(self, path: str):
        keys = npz_keys(path)
        if "arr_0" not in keys:
            raise DataError(f"{path}: an image batch needs 'arr_0' (uint8 N x H x W x 3), found {keys}")
        self.images = open_npz_array(path, "arr_0")
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise DataError(f"{path}: 'arr_0' must be uint8 N x H x W x 3 (RGB), got {self.images.dtype} "
                            f"{tuple(self.images.shape)}")
        if self.images.shape[0] == 0:
            raise DataError(f"{path}: 'arr_0' holds no images")
        self.size = (self.images.shape[2], self.images.shape[1])  # (W, H)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict:
        image = torch.from_numpy(np.array(self.images[index])).permute(2, 0, 1)  # (3, H, W)
        return {"image": image, "resized": False, "error": ""}


def open_npz_array(path: str, name: str) -> np.ndarray:
    """Array `name` of an `.npz`: a read-only memory map if stored uncompressed, else loaded whole.

    np.load cannot memory-map inside an archive, and 50,000 images at 256 px are 9.8 GB.
    """
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        with np.load(path) as archive:
            return archive[name]
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local = ZIP_LOCAL_HEADER.unpack(handle.read(ZIP_LOCAL_HEADER.size))
        handle.seek(info.header_offset + ZIP_LOCAL_HEADER.size + local[-2] + local[-1])
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(handle)
        offset = handle.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran_order else "C")


def open_images(path: str) -> FolderImages | NpzImages:
    """A folder of images or an `.npz` image batch."""
    if os.path.isdir(path):
        return FolderImages(path)
    if os.path.isfile(path) and path.endswith(".npz"):
        return NpzImages(path)
    raise DataError(f"{path}: not a folder of images or an .npz image batch (arr_0 uint8 N x H x W x 3)")


class NpzImageWriter:
    """Writes an ADM-style `.npz` batch by batch: arr_0 uint8 (N, H, W, 3) of N = len(labels) images, then
    the labels.

    Stored uncompressed, so readers can memory-map arr_0. Used as a context manager: the file appears
    (renamed) only when the block completes, and a failed block leaves nothing behind.
    """

    def __init__(self, path: str, labels: np.ndarray, height: int, width: int):
        self.path, self.tmp = path, f"{path}.tmp{os.getpid()}"
        self.labels = labels.astype(np.int64)
        self.shape, self.written = (len(labels), height, width, 3), 0

    def __enter__(self) -> NpzImageWriter:
        self.archive = zipfile.ZipFile(self.tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.stream = self.archive.open("arr_0.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": self.shape}
        np.lib.format.write_array_header_1_0(self.stream, header)
        return self

    def add(self, images: np.ndarray) -> None:
        self.stream.write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
        self.written += images.shape[0]

    def __exit__(self, error_type, error, traceback) -> None:
        self.stream.close()
        if error_type is None and self.written != self.shape[0]:
            raise RuntimeError(f"{self.path}: {self.written} images written, {self.shape[0]} announced")
        if error_type is None:
            buffer = io.BytesIO()
            np.save(buffer, self.labels)
            for name in ("labels.npy", "arr_1.npy"):
                self.archive.writestr(name, buffer.getvalue())
        self.archive.close()
        if error_type is None:
            os.replace(self.tmp, self.path)
        else:
            os.remove(self.tmp)
