"""Datasets, the official transforms, a resumable distributed sampler and image grids.

Every dataset returns `{"image": (3, H, W) float in [-1, 1], "label": int, "skipped": int}` and
has `set_epoch(epoch)`. Random augmentation of item i in epoch e runs under a torch RNG seeded
with (dataset seed, e, i) inside `torch.random.fork_rng`, so a sample does not depend on the
number of DataLoader workers or processes, and the caller's global RNG is left untouched: a
resumed run sees exactly the images it would have seen.

Dataset types: `shapes` (built in, procedurally drawn, needs no files), `folder`, `imagenet`,
`imagenet_u` (ImageNet without labels, as the official RQ-VAE), `ffhq`, `lsun-church`,
`lsun-bedroom`, `lsun-cat` (LSUN exported from lmdb to image folders). The official RQ-VAE
spellings (`LSUN-church`, transform `ffhq256x256`) are accepted as written.

Caption datasets add `"caption": str` to each item (label -1 when there is no class): `captions`
(an image folder and a captions file), `cc3m` (the official CC-3M layout), `coco_2014val`
(MS-COCO 2014 val captions), and `shapes` with `captions: true` (see common/captions.py).
"""
from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.utils import make_grid

from common.captions import (cc3m_list_file, coco_annotations_file, coco_captions, coco_image_folder,
                             default_captions_file, read_captioned_files, require_images)
from common.config import ANY, Field
from common.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # compared lower-case, so .JPEG too
SPLITS = ("train", "val")

DATASET_SCHEMA = {
    "type": Field(str, doc="shapes, folder, imagenet, imagenet_u, ffhq, lsun-church, lsun-bedroom, lsun-cat, "
                           "captions, cc3m, coco_2014val"),
    "root": Field(str, None, doc="image folder; default data/<type> (data/imagenet for imagenet_u, data/coco for "
                                 "coco_2014val)"),
    "captions_file": Field(str, None, doc="captions: a .tsv (file<TAB>caption) or .jsonl ({file, caption}), files "
                                          "relative to root (default root/captions.jsonl or root/captions.tsv); "
                                          "coco_2014val: the annotation JSON (default: the official 30K sample "
                                          "file, else captions_val2014.json)"),
    "captions": Field(bool, False, doc="shapes: caption each image from its class, colour and position"),
    "transforms": {
        "type": Field(str, None, doc="ffhq, imagenet, lsun, center_crop, random_crop, openmagvit2, dalle-vqvae, "
                                     "none, or an official name (ffhq256x256, imagenet256x256, LSUN-church); "
                                     "default: the dataset's official transform"),
    },
    "resolution": Field(int, None, minimum=1,
                        doc="image side; default 32 for shapes, 256 otherwise or from an official name"),
    "flip": Field(bool, None, doc="random horizontal flip in training; null = the transform's official choice"),
    "num_samples": Field(int, None, minimum=1,
                         doc="shapes: dataset size; folders: an evenly spaced subset of this many images"),
    "seed": Field(int, 0, doc="seeds the augmentation (and the drawing of shapes)", minimum=0),
    "vocab_size": Field(int, None, doc="official stage-2 key, unused by the data", minimum=1),
    "transform": ANY,  # a misspelled duplicate the official RQ-VAE set-up writes into saved configs
}


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from non-negative ints (seed, stream, epoch, index, ...)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


# Augmentation, shape drawing and captioned-shape drawing on separate random streams.
_AUGMENT_STREAM, _DRAW_STREAM, _CAPTIONED_DRAW_STREAM = 1, 2, 3


class AugmentedDataset(Dataset):
    """Base of every dataset here: an epoch, a seed, and a transform seeded per (seed, epoch, index)."""

    def __init__(self, transform: Callable, seed: int = 0):
        if seed < 0:
            raise DataError(f"dataset.seed must be a non-negative int, got {seed}")
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Call before building the epoch's DataLoader (workers copy the dataset when they start)."""
        self.epoch = epoch

    def augment(self, image: Any, index: int) -> torch.Tensor:
        # Like torch.random.fork_rng + torch.manual_seed, without their ~0.3 ms of per-device bookkeeping:
        # torchvision's random transforms draw from the CPU default generator only.
        saved = torch.get_rng_state()
        torch.default_generator.manual_seed(derive_seed(self.seed, _AUGMENT_STREAM, self.epoch, index))
        try:
            return self.transform(image)
        finally:
            torch.set_rng_state(saved)


# ----------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------

TRANSFORM_KINDS = ("ffhq", "imagenet", "lsun", "center_crop", "random_crop", "openmagvit2", "dalle-vqvae", "none")
_FLIPS_BY_DEFAULT = {"ffhq", "imagenet", "center_crop", "random_crop"}  # official training recipes that flip
_TO_TENSOR = [T.ToTensor(), T.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])]  # uint8 v -> v / 127.5 - 1


def halve_while_large(image: Image.Image, short_side: int) -> Image.Image:
    """ADM's cheap anti-aliasing: BOX-halve the image while its short side is at least twice `short_side`."""
    while min(image.size) >= 2 * short_side:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    return image


def resize_short_side(image: Image.Image, short_side: int) -> Image.Image:
    """BOX halving, then BICUBIC so the short side is exactly `short_side` (long side rounded)."""
    image = halve_while_large(image, short_side)
    scale = short_side / min(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)


class CenterCropArr:
    """ADM `center_crop_arr` (LlamaGen, MAR): resize the short side to `size`, crop the centre."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        image = resize_short_side(image, self.size)
        left, top = (image.width - self.size) // 2, (image.height - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))


class RandomCropArr:
    """LlamaGen `random_crop_arr`: short side drawn in [size/max_frac, size/min_frac], then a random crop.

    Draws from torch's RNG (the official code uses python `random`) so the per-item seeding covers it.
    """

    def __init__(self, size: int, min_frac: float = 0.8, max_frac: float = 1.0):
        self.size, self.min_frac, self.max_frac = size, min_frac, max_frac

    def __call__(self, image: Image.Image) -> Image.Image:
        low, high = math.ceil(self.size / self.max_frac), math.ceil(self.size / self.min_frac)
        image = resize_short_side(image, int(torch.randint(low, high + 1, ())))
        left = int(torch.randint(image.width - self.size + 1, ()))
        top = int(torch.randint(image.height - self.size + 1, ()))
        return image.crop((left, top, left + self.size, top + self.size))


class CheckSize:
    """The `none` transform's guard: images must already be `size` x `size`."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
        height, width = (image.height, image.width) if isinstance(image, Image.Image) else image.shape[:2]
        if (height, width) != (self.size, self.size):
            raise DataError(f"transform 'none' needs {self.size}x{self.size} images, got {width}x{height}; "
                            "set dataset.transforms.type to center_crop (or another resizing transform)")
        return image


class DalleCrop:
    """The official CC-3M training crop (`dalle-vqvae`, DALL-E's): a square of the short side whose offset is drawn
    from the middle quarter of the slack, resized to a side drawn in [size, 9/8 size] (at most the short side)."""

    def __init__(self, size: int):
        self.size = size

    @staticmethod
    def offset(slack: int) -> int:
        low = 3 * slack // 8
        return int(torch.randint(low, max(low + 1, 5 * slack // 8), ()))

    def __call__(self, image: Image.Image) -> Image.Image:
        side = min(image.size)
        top, left = self.offset(image.height - side), self.offset(image.width - side)  # the official draw order
        largest = max(min(side, round(9 / 8 * self.size)), self.size)
        target = int(torch.randint(self.size, largest + 1, ()))
        return TF.resize(TF.crop(image, top, left, side, side), [target, target])


def build_transform(name: str, resolution: int, train: bool, flip: bool | None = None) -> T.Compose:
    """The official pipeline `name` at `resolution`: PIL RGB image -> (3, res, res) float in [-1, 1].

    `flip` switches the random horizontal flip of training on or off; None keeps the official
    choice of that pipeline (ffhq, imagenet, center_crop, random_crop flip; lsun, openmagvit2,
    dalle-vqvae, none do not). Evaluation never flips.
    """
    if name not in TRANSFORM_KINDS:
        raise DataError(f"dataset.transforms.type {name!r} is not known; choose one of {', '.join(TRANSFORM_KINDS)}, "
                        "or an official name such as ffhq256x256, imagenet256x256, LSUN-church")
    if resolution < 1:
        raise DataError(f"dataset.resolution must be a positive int, got {resolution}")
    if name == "ffhq" and train:
        steps = [T.RandomResizedCrop(resolution, scale=(0.75, 1.0), ratio=(1.0, 1.0))]
    elif name in ("imagenet", "openmagvit2") and train:
        steps = [T.Resize(resolution), T.RandomCrop(resolution)]
    elif name in ("ffhq", "imagenet", "openmagvit2", "lsun"):
        steps = [T.Resize(resolution), T.CenterCrop(resolution)]
    elif name == "random_crop" and train:
        steps = [RandomCropArr(resolution)]
    elif name in ("center_crop", "random_crop"):
        steps = [CenterCropArr(resolution)]
    elif name == "dalle-vqvae" and train:
        steps = [DalleCrop(resolution), T.RandomCrop(resolution)]
    elif name == "dalle-vqvae":
        steps = [T.Resize((resolution, resolution))]  # officially a squash, not a crop
    else:
        steps = [CheckSize(resolution)]
    steps += _TO_TENSOR
    if train and (name in _FLIPS_BY_DEFAULT if flip is None else flip):
        steps.append(T.RandomHorizontalFlip(p=0.5))  # on the tensor: the same pixels as on the PIL image
    return T.Compose(steps)


_LSUN_TRANSFORM_NAMES = ("lsun", "lsun-cat", "lsun-church", "lsun-bedroom")


def parse_official_transform(name: str) -> tuple[str, int]:
    """Official RQ-VAE transform names: `ffhq256x256` -> ("ffhq", 256), `imagenet256x256` -> ("imagenet", 256),
    `LSUN`, `LSUN-church`, ... -> ("lsun", 256) (the official code supports LSUN at 256 only)."""
    lowered = name.lower()
    if lowered in _LSUN_TRANSFORM_NAMES:
        return "lsun", 256
    match = re.fullmatch(r"imagenet(\d+)x(\d+)", lowered)
    if match and match.group(1) == match.group(2):
        return "imagenet", int(match.group(1))
    if "ffhq" in lowered:
        side = lowered.split("_")[0].split("x")[-1]  # the official rule: text after the last 'x'
        if side.isdigit():
            return "ffhq", int(side)
    raise DataError(f"dataset.transforms.type {name!r} is not known; choose one of {', '.join(TRANSFORM_KINDS)}, "
                    "or an official name such as ffhq256x256, imagenet256x256, LSUN-church")


def resolve_transform(name: str, resolution: int | None) -> tuple[str, int | None]:
    """(kind, resolution) from our kind names or an official name; a conflicting resolution is refused."""
    if name in TRANSFORM_KINDS:
        return name, resolution
    kind, named_resolution = parse_official_transform(name)
    if resolution is not None and resolution != named_resolution:
        raise DataError(f"dataset.resolution {resolution} disagrees with dataset.transforms.type {name!r} "
                        f"({named_resolution}); drop one of them")
    return kind, named_resolution


# ----------------------------------------------------------------------------------------------
# Built-in data: procedurally drawn shapes
# ----------------------------------------------------------------------------------------------

def _polygon(radii: Sequence[float], start: float = -math.pi / 2) -> np.ndarray:
    """Unit outline (k, 2) with vertex i at radius radii[i], evenly spaced angles."""
    angles = start + 2 * math.pi * np.arange(len(radii)) / len(radii)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.asarray(radii)[:, None]


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # image y points down
    points = np.stack([x, y], axis=1)
    points -= (points.max(0) + points.min(0)) / 2
    return points / np.abs(points).max()


_CIRCLE = _polygon([1.0] * 64)
_ARM = 0.32  # half-width of the cross's arms
# Each class is a list of (unit outline, fill): 255 paints the shape, 0 cuts a hole into it.
SHAPES: dict[str, list[tuple[np.ndarray, int]]] = {
    "circle": [(_CIRCLE, 255)],
    "square": [(_polygon([1.0] * 4, start=math.pi / 4), 255)],
    "triangle": [(_polygon([1.0] * 3), 255)],
    "star": [(_polygon([1.0, 0.42] * 5), 255)],
    "hexagon": [(_polygon([1.0] * 6), 255)],
    "ring": [(_CIRCLE, 255), (_CIRCLE * 0.55, 0)],
    "cross": [(np.array([[_ARM, -1], [_ARM, -_ARM], [1, -_ARM], [1, _ARM], [_ARM, _ARM], [_ARM, 1],
                         [-_ARM, 1], [-_ARM, _ARM], [-1, _ARM], [-1, -_ARM], [-_ARM, -_ARM], [-_ARM, -1]]), 255)],
    "diamond": [(np.array([[1.0, 0.0], [0.0, 0.55], [-1.0, 0.0], [0.0, -0.55]]), 255)],
    "heart": [(_heart(), 255)],
    "crescent": [(_CIRCLE, 255), (_CIRCLE * 0.85 + np.array([0.45, 0.0]), 0)],
}


def supersampling(resolution: int) -> int:
    """How many times larger than the image shape masks are drawn before box-downsampling (smooth edges)."""
    return 4 if resolution <= 64 else 2


def shape_alpha(kind: str, resolution: int, radius: float, center: np.ndarray, angle: float) -> Image.Image:
    """The (res, res) coverage mask of a shape of `kind` turned by `angle`; `radius` and `center` (x, y) are in
    pixels of the supersampled canvas."""
    supersample = supersampling(resolution)
    canvas = resolution * supersample
    rotation = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    mask = Image.new("L", (canvas, canvas), 0)
    pen = ImageDraw.Draw(mask)
    for outline, fill in SHAPES[kind]:
        points = outline @ rotation * radius + center
        pen.polygon([tuple(p) for p in points.tolist()], fill=fill)
    return mask.reduce(supersample)  # box filter down to (res, res)


def draw_shape(kind: str, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """One (res, res, 3) uint8 image: a shape of `kind` with random size, place, angle, colours and background.

    The mask is drawn at 2x-4x and box-downsampled for smooth edges, then blended over a flat or
    two-colour gradient background.
    """
    canvas = resolution * supersampling(resolution)
    radius = rng.uniform(0.2, 0.4) * canvas
    center = rng.uniform(radius, canvas - radius, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    alpha = shape_alpha(kind, resolution, radius, center, angle)

    first = rng.uniform(0, 255, size=3)
    if rng.uniform() < 0.5:
        background = Image.new("RGB", alpha.size, tuple(np.rint(first).astype(int).tolist()))
    else:
        second = np.clip(first + rng.uniform(-90, 90, size=3), 0, 255)
        direction = rng.uniform(0, 2 * math.pi)
        ramp = np.linspace(-0.5, 0.5, resolution, dtype=np.float32) / math.sqrt(2)
        t = ramp[None, :] * math.cos(direction) + ramp[:, None] * math.sin(direction) + 0.5  # (res, res) in [0, 1]
        gradient = first.astype(np.float32) + (second - first).astype(np.float32) * t[..., None]  # (res, res, 3)
        background = Image.fromarray(np.rint(gradient).astype(np.uint8))
    # Every channel at least 80 levels (circularly) from the background's first colour: always visible.
    foreground = tuple(((first + rng.uniform(80, 176, size=3)) % 256).astype(int).tolist())
    return np.array(Image.composite(Image.new("RGB", alpha.size, foreground), background, alpha))


class ShapesDataset(AugmentedDataset):
    """Built-in labelled images that need no download: image i of a split is always the same pixels.

    Class of index i is i % 10 (balanced); splits draw from different random streams. `flip`
    adds a random horizontal flip seeded per (seed, epoch, index) like every other augmentation.
    """

    class_names = list(SHAPES)
    num_classes = len(SHAPES)
    default_sizes = {"train": 10_000, "val": 1_000}

    def __init__(self, split: str = "train", resolution: int = 32, num_samples: int | None = None, seed: int = 0,
                 flip: bool = False):
        check_split(split)
        if not isinstance(resolution, int) or resolution < 8:
            raise DataError(f"dataset.resolution must be an int >= 8 for shapes, got {resolution!r}")
        if num_samples is not None and num_samples < 1:
            raise DataError(f"dataset.num_samples must be a positive int, got {num_samples}")
        super().__init__(build_transform("none", resolution, train=True, flip=flip), seed)
        self.split, self.resolution = split, resolution
        self.num_samples = num_samples if num_samples is not None else self.default_sizes[split]

    def __len__(self) -> int:
        return self.num_samples

    def draw(self, index: int) -> np.ndarray:
        """The (res, res, 3) uint8 pixels of image `index`, before augmentation."""
        rng = np.random.default_rng([self.seed, _DRAW_STREAM, SPLITS.index(self.split), index])
        return draw_shape(self.class_names[index % self.num_classes], self.resolution, rng)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return {"image": self.augment(self.draw(index), index), "label": index % self.num_classes, "skipped": 0}


SHAPE_COLOURS = {"red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 160, 60),
                 "blue": (40, 80, 220), "purple": (140, 50, 180), "white": (245, 245, 245), "black": (20, 20, 20)}
PLACES = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))


def with_article(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


@dataclass(frozen=True)
class ShapeScene:
    """What one captioned shape image shows. `radius` and `center` (x, y) are in supersampled canvas pixels."""

    kind: str
    colour: str
    background: str
    row: int  # 0 top, 1 middle, 2 bottom third of the image
    column: int  # 0 left, 1 middle, 2 right third
    radius: float
    center: tuple[float, float]
    angle: float

    @property
    def caption(self) -> str:
        return (f"{with_article(self.colour)} {self.kind} on {with_article(self.background)} background, "
                f"{PLACES[self.row][self.column]}")


def random_scene(kind: str, resolution: int, rng: np.random.Generator) -> ShapeScene:
    """A shape of `kind` in two different named colours, centred in a random one of nine places."""
    canvas = resolution * supersampling(resolution)
    colour, background = rng.choice(len(SHAPE_COLOURS), size=2, replace=False)
    row, column = rng.integers(3, size=2)
    radius = rng.uniform(0.12, 0.16) * canvas
    # Centres near 0.2, 0.5, 0.8 of each side: inside their third, and the shape inside the image.
    x, y = (0.2 + 0.3 * np.array([column, row]) + rng.uniform(-0.03, 0.03, size=2)) * canvas
    angle = rng.uniform(0, 2 * math.pi)
    names = list(SHAPE_COLOURS)
    return ShapeScene(kind, names[colour], names[background], int(row), int(column), radius, (x, y), angle)


def draw_scene(scene: ShapeScene, resolution: int) -> np.ndarray:
    """The (res, res, 3) uint8 pixels of `scene`: the shape in its colour over a plain background."""
    alpha = shape_alpha(scene.kind, resolution, scene.radius, np.array(scene.center), scene.angle)
    shape = Image.new("RGB", alpha.size, SHAPE_COLOURS[scene.colour])
    return np.array(Image.composite(shape, Image.new("RGB", alpha.size, SHAPE_COLOURS[scene.background]), alpha))


class CaptionedShapesDataset(ShapesDataset):
    """The built-in shapes for text-to-image, each with a caption that is true of it ("a red star on a blue
    background, top left"): named colours and nine places, drawn on their own random stream, so the uncaptioned
    shapes stay as they are. No flip, which would turn left into right."""

    def __init__(self, split: str = "train", resolution: int = 32, num_samples: int | None = None, seed: int = 0):
        super().__init__(split, resolution, num_samples, seed)

    def scene(self, index: int) -> ShapeScene:
        rng = np.random.default_rng([self.seed, _CAPTIONED_DRAW_STREAM, SPLITS.index(self.split), index])
        return random_scene(self.class_names[index % self.num_classes], self.resolution, rng)

    def draw(self, index: int) -> np.ndarray:
        return draw_scene(self.scene(index), self.resolution)

    @property
    def captions(self) -> list[str]:
        return [self.scene(index).caption for index in range(len(self))]

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        item["caption"] = self.scene(index).caption
        return item


# ----------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------

class UnreadableImageWarning(UserWarning):
    """An image file could not be decoded; a neighbouring image was used in its place."""


def list_images(folder: str) -> list[str]:
    """Every image file under `folder` (recursive, symlinks followed), sorted by path."""
    paths = []
    for directory, _, files in os.walk(folder, followlinks=True):
        paths.extend(os.path.join(directory, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(paths)


class ImageFolderDataset(AugmentedDataset):
    """Images from a list of files. An unreadable file never stops an epoch: it is reported once
    (UnreadableImageWarning) and the next readable index (wrapping) is returned in its place with
    "skipped" = 1, so summing "skipped" over batches counts the unreadable files drawn while the
    batch shape stays constant (DDP needs that). With `captions`, each item has the "caption" of the
    image it holds (the neighbour's, when one was skipped)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], transform: Callable, seed: int = 0,
                 root: str = "", captions: Sequence[str] | None = None):
        super().__init__(transform, seed)
        self.paths, self.labels, self.root = list(paths), list(labels), root
        self.captions = list(captions) if captions is not None else None
        self.unreadable: set[int] = set()  # per process: each DataLoader worker learns on its own

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image | None:
        """The RGB image at `index`, or None (with a warning the first time) if it cannot be decoded."""
        if index in self.unreadable:
            return None
        try:
            with Image.open(self.paths[index]) as image:
                return image.convert("RGB")
        except Exception as error:  # noqa: BLE001 - PIL signals bad files with many exception types
            self.unreadable.add(index)
            warnings.warn(f"{self.paths[index]}: cannot read image ({type(error).__name__}: {error}); "
                          "using the next image instead", UnreadableImageWarning, stacklevel=2)
            return None

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        for offset in range(len(self)):
            position = (index + offset) % len(self)
            image = self.load(position)
            if image is not None:
                item = {"image": self.augment(image, index), "label": self.labels[position],
                        "skipped": int(offset > 0)}
                if self.captions is not None:
                    item["caption"] = self.captions[position]
                return item
        raise DataError(f"none of the {len(self)} images under {self.root} can be read; check dataset.root")


def require_folder(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise DataError(f"dataset.root: no directory {path} ({what}); put the images there or set dataset.root=PATH")


def split_folder(root: str, split: str) -> str:
    """`root/<split>` when the folder has both train/ and val/, else the whole folder for either split."""
    if all(os.path.isdir(os.path.join(root, s)) for s in SPLITS):
        return os.path.join(root, split)
    return root


def plain_folder_files(root: str, split: str) -> tuple[list[str], list[int]]:
    folder = split_folder(root, split)
    paths = list_images(folder)
    if not paths:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found; check dataset.root")
    return paths, [0] * len(paths)


def class_folders(folder: str) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir(follow_symlinks=True))


def imagenet_files(root: str, split: str, labelled: bool = True) -> tuple[list[str], list[int]]:
    """`root/<split>/<class>/*` with labels = index of the class in the sorted train class folders
    (the split's own folders when there is no train/, as for a validation-only copy)."""
    folder = os.path.join(root, split)
    require_folder(folder, f"ImageNet {split} images as {folder}/<class>/*.JPEG")
    train_folder = os.path.join(root, "train")
    classes = class_folders(train_folder if os.path.isdir(train_folder) else folder)
    if not classes:
        raise DataError(f"{folder}: no class folders; ImageNet needs {folder}/<class>/*.JPEG")
    label_of = {name: i for i, name in enumerate(classes)}
    paths, labels = [], []
    for name in class_folders(folder):
        if name not in label_of:
            raise DataError(f"{folder}/{name}: a class folder missing from {train_folder}; "
                            "the splits must share classes")
        found = list_images(os.path.join(folder, name))
        paths += found
        labels += [label_of[name] if labelled else 0] * len(found)
    if not paths:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found in its class folders")
    return paths, labels


def evenly_spaced(count: int, total: int) -> list[int]:
    return np.linspace(0, total - 1, count).round().astype(int).tolist()


# ----------------------------------------------------------------------------------------------
# Building datasets from names and configs
# ----------------------------------------------------------------------------------------------

_DEFAULT_TRANSFORM = {"folder": "center_crop", "imagenet": "imagenet", "imagenet_u": "imagenet", "ffhq": "ffhq",
                      "lsun-church": "lsun", "lsun-bedroom": "lsun", "lsun-cat": "lsun",
                      "captions": "center_crop", "cc3m": "dalle-vqvae", "coco_2014val": "dalle-vqvae"}
DATASET_TYPES = ("shapes", *_DEFAULT_TRANSFORM)
CAPTION_TYPES = ("captions", "cc3m", "coco_2014val")
_DEFAULT_ROOT = {"imagenet_u": os.path.join("data", "imagenet"), "coco_2014val": os.path.join("data", "coco")}


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split {split!r} (--split / dataset.split) must be 'train' or 'val'")


def check_dataset_type(type: str) -> str:
    """The lower-cased dataset type, refused when unknown."""
    if type.lower() not in DATASET_TYPES:
        raise DataError(f"dataset.type {type!r} is not known; choose one of {', '.join(DATASET_TYPES)}")
    return type.lower()


def dataset_root(kind: str, root: str | None) -> str:
    """`root`, else the type's default folder (data/<type>); folder and captions have none."""
    if root is not None:
        return root
    if kind in ("folder", "captions"):
        raise DataError(f"dataset.root is required for dataset.type {kind}; set dataset.root=PATH")
    return _DEFAULT_ROOT.get(kind, os.path.join("data", kind))


def kept_indices(num_samples: int | None, total: int) -> list[int] | None:
    """The evenly spaced subset `dataset.num_samples` keeps of `total` items; None keeps all."""
    if num_samples is None:
        return None
    if num_samples < 1:
        raise DataError(f"dataset.num_samples must be a positive int, got {num_samples}")
    return evenly_spaced(min(num_samples, total), total)


def caption_entries(kind: str, split: str, root: str, captions_file: str | None
                    ) -> tuple[str, list[str], list[str]]:
    """(the file that lists them, image names, captions) of a caption dataset; the images are not looked at.
    Names are relative to `root`, or for coco_2014val to its val2014 folder. A caption set has no train/val
    division except CC-3M's: the other types serve the same items for both splits."""
    if captions_file is not None and kind not in ("captions", "coco_2014val"):
        raise DataError(f"dataset.captions_file is read by dataset.type captions and coco_2014val, not {kind}; "
                        "remove it")
    if kind == "coco_2014val":
        annotations = coco_annotations_file(root, captions_file)
        return (annotations, *coco_captions(annotations))
    listing = cc3m_list_file(root, split) if kind == "cc3m" else captions_file or default_captions_file(root)
    return (listing, *read_captioned_files(listing))


def build_dataset(type: str, split: str, root: str | None = None, resolution: int | None = None,
                  transform: str | None = None, flip: bool | None = None, num_samples: int | None = None,
                  seed: int = 0, augment: bool | None = None, captions_file: str | None = None,
                  captions: bool = False) -> AugmentedDataset:
    """A dataset by name. `transform` is one of TRANSFORM_KINDS or an official RQ-VAE name (which
    fixes the resolution); it defaults to the dataset's official transform. `flip` applies to the
    train split only (None: the transform's official choice). `root` defaults to data/<type>.
    `augment` picks the training (random) or the evaluation form of the transform; default: train split.
    `captions_file` lists the images of a `captions` dataset (or is COCO's annotation file); `captions`
    captions the shapes."""
    kind = check_dataset_type(type)
    check_split(split)
    augment = split == "train" if augment is None else augment
    if captions and kind != "shapes":
        raise DataError(f"dataset.captions applies to the built-in shapes; dataset.type {kind} "
                        f"{'has its captions already' if kind in CAPTION_TYPES else 'has no captions'}")
    if kind == "shapes":
        if transform not in (None, "none"):
            raise DataError(f"dataset.transforms.type {transform!r}: shapes are drawn at dataset.resolution; "
                            "leave the transform unset")
        if not captions:
            return ShapesDataset(split, resolution or 32, num_samples, seed, flip=bool(flip) and augment)
        if flip and augment:
            raise DataError("dataset.flip: a flip would turn left into right in the shapes' captions; "
                            "set dataset.flip=false with dataset.captions=true")
        return CaptionedShapesDataset(split, resolution or 32, num_samples, seed)

    name, resolution = resolve_transform(transform or _DEFAULT_TRANSFORM[kind], resolution)
    pipeline = build_transform(name, resolution or 256, train=augment, flip=flip)
    root = dataset_root(kind, root)
    require_folder(root, f"the {kind} images")
    texts, listing = None, ""
    if kind in CAPTION_TYPES:
        listing, names, texts = caption_entries(kind, split, root, captions_file)
        folder = coco_image_folder(root) if kind == "coco_2014val" else root
        paths, labels = [os.path.join(folder, name) for name in names], [-1] * len(names)
    elif kind.startswith("imagenet"):
        paths, labels = imagenet_files(root, split, labelled=kind == "imagenet")
    else:
        paths, labels = plain_folder_files(root, split)
    keep = kept_indices(num_samples, len(paths))
    if keep is not None:
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        texts = [texts[i] for i in keep] if texts is not None else None
    if texts is not None:
        require_images(paths, listing)
    return ImageFolderDataset(paths, labels, pipeline, seed, root=root, captions=texts)


def build_dataset_from_config(cfg_dataset: Mapping[str, Any], split: str, augment: bool | None = None
                              ) -> AugmentedDataset:
    """`build_dataset` from a `dataset:` section (DATASET_SCHEMA, official RQ-VAE configs included)."""
    transforms = cfg_dataset.get("transforms") or {}
    return build_dataset(cfg_dataset["type"], split, root=cfg_dataset.get("root"),
                         resolution=cfg_dataset.get("resolution"), transform=transforms.get("type"),
                         flip=cfg_dataset.get("flip"), num_samples=cfg_dataset.get("num_samples"),
                         seed=cfg_dataset.get("seed") or 0, augment=augment,
                         captions_file=cfg_dataset.get("captions_file"), captions=bool(cfg_dataset.get("captions")))


def caption_list(cfg_dataset: Mapping[str, Any], split: str) -> list[str]:
    """The captions of a split of a caption dataset (a `dataset:` section), in item order with `num_samples`
    applied, without opening any image: the prompts of text-to-image sampling over a data set."""
    kind = check_dataset_type(cfg_dataset["type"])
    check_split(split)
    num_samples = cfg_dataset.get("num_samples")
    if kind == "shapes" and cfg_dataset.get("captions"):
        return CaptionedShapesDataset(split, cfg_dataset.get("resolution") or 32, num_samples,
                                      cfg_dataset.get("seed") or 0).captions
    if kind not in CAPTION_TYPES:
        raise DataError(f"dataset.type {kind} has no captions; use {', '.join(CAPTION_TYPES)}, "
                        "or shapes with dataset.captions=true")
    root = dataset_root(kind, cfg_dataset.get("root"))
    _, _, texts = caption_entries(kind, split, root, cfg_dataset.get("captions_file"))
    keep = kept_indices(num_samples, len(texts))
    return texts if keep is None else [texts[i] for i in keep]


# ----------------------------------------------------------------------------------------------
# Sampling and loading
# ----------------------------------------------------------------------------------------------

class ResumableDistributedSampler(Sampler[int]):
    """torch's DistributedSampler, plus resuming in the middle of an epoch.

    Epoch e's order is a permutation from a torch.Generator seeded with seed + e (identity when
    not shuffling), padded by repetition or cut (drop_last) to a multiple of num_replicas; rank r
    takes positions r, r + world, r + 2 world, ... So the k-th batch of b on every rank together
    hold exactly the k-th global batch of world * b positions of that order, and one process with
    batch world * b sees the same global batches as world processes with batch b.
    `set_epoch(epoch, start_index)` skips the first `start_index` samples of this rank.
    """

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        self.dataset_len, self.num_replicas, self.rank = dataset_len, num_replicas, rank
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        per_rank = dataset_len // num_replicas if drop_last else math.ceil(dataset_len / num_replicas)
        self.samples_per_rank = per_rank
        self.epoch, self.start_index = 0, 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        if not 0 <= start_index <= self.samples_per_rank:
            raise DataError(f"cannot resume at sample {start_index} of epoch {epoch}: this rank has only "
                            f"{self.samples_per_rank}; resume with the batch size and process count of the run")
        self.epoch, self.start_index = epoch, start_index

    def epoch_order(self) -> list[int]:
        """All ranks' indices of the current epoch, padded or cut to samples_per_rank * num_replicas."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_len, generator=generator).tolist()
        else:
            order = list(range(self.dataset_len))
        total = self.samples_per_rank * self.num_replicas
        while len(order) < total:
            order += order[: total - len(order)]
        return order[:total]

    def __iter__(self) -> Iterator[int]:
        mine = self.epoch_order()[self.rank:: self.num_replicas]
        return iter(mine[self.start_index:])

    def __len__(self) -> int:
        return self.samples_per_rank - self.start_index


def build_loader(dataset: Dataset, batch_size: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, num_workers: int = 0, epoch: int = 0, start_index: int = 0,
                 drop_last: bool = True) -> DataLoader:
    """A DataLoader over this rank's share of `epoch`, starting after `start_index` of its samples."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    sampler = ResumableDistributedSampler(len(dataset), num_replicas, rank, shuffle, seed, drop_last)
    sampler.set_epoch(epoch, start_index)
    # A private generator keeps the DataLoader from drawing worker seeds from the global RNG.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# Images out
# ----------------------------------------------------------------------------------------------

def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images (N, 3, H, W) -> uint8 (N, H, W, 3) on the CPU: round(clamp((x + 1) / 2, 0, 1) * 255).

    Rounds to nearest (ties to even); LlamaGen truncates 127.5 x + 128, which differs only on exact ties.
    """
    scaled = ((images.detach().float() + 1) / 2).clamp(0, 1) * 255
    return scaled.round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_image_grid(images: torch.Tensor, path: str, nrow: int | None = None) -> None:
    """Write [-1, 1] images (N, 3, H, W) as one PNG grid (nrow per row, default about square)."""
    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    grid = make_grid(images.detach().float().cpu(), nrow=nrow, padding=2, pad_value=-1.0)  # (3, H', W')
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    Image.fromarray(to_uint8(grid[None])[0].numpy()).save(path)
