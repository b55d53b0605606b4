"""A small CNN that recognises the ten built-in shapes, its training recipe and its cached weights file.

Trained once on the shapes train split (fixed images, fixed seed, one CPU thread, so the same weights on
every run), scored on the whole shapes val split, and written with its recipe,
its held-out accuracy and the val split's features to one file. Its penultimate layer (128-d) is
the feature space of the shapes evaluator (`common.metrics.shapes`).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.checkpoint import load_checkpoint, strict_load
from common.data import ShapesDataset, to_uint8
from common.dist import intra_op_threads
from common.errors import CheckpointError, DataError

KIND = "shapes-classifier"
CLASSIFIER_FILE = "shapes-classifier.pt"
RESOLUTION = 32
NUM_CLASSES = ShapesDataset.num_classes
NUM_VAL_IMAGES = ShapesDataset.default_sizes["val"]
BATCH = 500  # images per forward pass when classifying


@dataclass(frozen=True)
class ClassifierRecipe:
    """Everything the weights depend on; a cached file with another recipe is retrained."""

    train_images: int = 5_000
    epochs: int = 4
    batch_size: int = 32  # many small steps learn these shapes faster per image seen than few large ones
    lr: float = 5e-3
    weight_decay: float = 1e-4
    width: int = 16
    feature_dim: int = 128
    soften_fraction: float = 0.5  # of the training images, shrunk and enlarged back (`soften`)
    soften_min_side: int = 12
    noise_images: int = 4  # per batch, uniform noise with a uniform target (`with_noise`)
    seed: int = 0


RECIPE = ClassifierRecipe()


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class ShapesClassifier(nn.Module):
    """Per-image standardisation, four conv stages (32 -> 16 -> 8 -> 4 px), global average pooling, a feature
    layer and the class logits."""

    def __init__(self, width: int = RECIPE.width, feature_dim: int = RECIPE.feature_dim):
        super().__init__()
        self.body = nn.Sequential(
            conv_block(3, width), conv_block(width, width), nn.MaxPool2d(2),  # (B, w, 16, 16)
            conv_block(width, 2 * width), nn.MaxPool2d(2),  # (B, 2w, 8, 8)
            conv_block(2 * width, 4 * width), nn.MaxPool2d(2),  # (B, 4w, 4, 4)
            conv_block(4 * width, 8 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, 8w)
            nn.Linear(8 * width, feature_dim), nn.ReLU(inplace=True))  # (B, feature_dim): the feature space
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, 32, 32) in [-1, 1] -> logits (B, 10), features (B, feature_dim)."""
        # Colours of shape and background are random, only the outline tells the class: standardising each
        # image takes the colour scale away and makes training converge in a fraction of the steps.
        images = images - images.mean(dim=(2, 3), keepdim=True)
        images = images / (images.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt() + 1e-2)
        features = self.body(images)
        return self.head(features), features


def as_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, 32, 32), or floats in [-1, 1] first rounded to uint8 as saved samples are -> floats in [-1, 1].

    The rounding makes scores of tensors equal to scores of the PNGs written from them.
    """
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, RESOLUTION, RESOLUTION):
        raise DataError(f"the shapes classifier takes images of shape (N, 3, {RESOLUTION}, {RESOLUTION}), "
                        f"got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        images = to_uint8(images).permute(0, 3, 1, 2)
    return images.float() / 127.5 - 1


def draw_shapes(split: str, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` images of a shapes split drawn with `seed`, uint8 (count, 3, 32, 32), and their labels."""
    dataset = ShapesDataset(split, RESOLUTION, count, seed)
    images = np.stack([dataset.draw(index) for index in range(count)])  # (count, 32, 32, 3)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.arange(count) % NUM_CLASSES


@torch.no_grad()
def classify(model: ShapesClassifier, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and features of any number of images, in batches, in eval mode, on the model's device (CPU out)."""
    model.eval()
    device = next(model.parameters()).device
    outputs = [model(as_classifier_input(images[start:start + BATCH]).to(device))
               for start in range(0, images.shape[0], BATCH)]
    return torch.cat([o[0] for o in outputs]).cpu(), torch.cat([o[1] for o in outputs]).cpu()


def flip_and_turn(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random mirror and quarter turn of a whole batch: every class, and its distribution, is closed under both."""
    if torch.rand((), generator=generator) < 0.5:
        batch = batch.flip(3)
    return torch.rot90(batch, int(torch.randint(4, (), generator=generator)), dims=(2, 3))


def soften(batch: torch.Tensor, generator: torch.Generator, fraction: float, min_side: int) -> torch.Tensor:
    """A random `fraction` of the images shrunk to a random side in [min_side, 32] px and enlarged back.

    Tokenizers and priors trained for minutes draw soft outlines that the eye still tells apart. Trained on
    crisp shapes only, the classifier recognised 26% of the val shapes shrunk to 16 px and back (95% with
    this) and 28% of a quickstart RQ-VAE's reconstructions (57%).
    """
    sides = torch.randint(min_side, RESOLUTION + 1, (batch.shape[0],), generator=generator)
    chosen = torch.rand(batch.shape[0], generator=generator) < fraction
    batch = batch.clone()
    for index in torch.nonzero(chosen & (sides < RESOLUTION)).flatten().tolist():
        side = int(sides[index])
        small = F.interpolate(batch[index:index + 1], size=(side, side), mode="bilinear", antialias=True)
        batch[index:index + 1] = F.interpolate(small, size=(RESOLUTION, RESOLUTION), mode="bilinear")
    return batch


def with_noise(batch: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
               count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch with its last `count` images replaced by uniform noise, and its targets: one-hot for shapes,
    uniform for noise.

    Softening taught the classifier to see a shape in anything: it put uniform noise among the real shapes (k-NN
    precision 0.99 for noise). A few noise images that belong to no class keep noise apart (precision 0).
    """
    targets = F.one_hot(labels, NUM_CLASSES).float()
    if count:
        noise = torch.rand(batch[-count:].shape, generator=generator) * 2 - 1
        batch = torch.cat([batch[:-count], noise])
        targets[-count:] = 1 / NUM_CLASSES
    return batch, targets


def train_classifier(recipe: ClassifierRecipe = RECIPE) -> dict:
    """Train on the shapes train split and score on the val split, on the CPU in one thread. Returns the file's
    payload: recipe, weights, val accuracy, val features and the training time."""
    # One thread: the same weights whatever the core count, and no threads spinning on a busy machine.
    with intra_op_threads(1):
        return train_in_this_thread(recipe)


def train_in_this_thread(recipe: ClassifierRecipe) -> dict:
    started = time.perf_counter()
    images, labels = draw_shapes("train", recipe.train_images)
    inputs = as_classifier_input(images)
    with torch.random.fork_rng(devices=[]):  # a fixed initialisation that leaves the caller's RNG alone
        torch.manual_seed(recipe.seed)
        model = ShapesClassifier(recipe.width, recipe.feature_dim)
    generator = torch.Generator().manual_seed(recipe.seed)  # batch order and augmentation
    steps_per_epoch = recipe.train_images // recipe.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.lr, total_steps=recipe.epochs * steps_per_epoch)
    model.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(recipe.train_images, generator=generator)
        for step in range(steps_per_epoch):
            batch = order[step * recipe.batch_size:(step + 1) * recipe.batch_size]
            augmented = soften(flip_and_turn(inputs[batch], generator), generator, recipe.soften_fraction,
                               recipe.soften_min_side)
            augmented, targets = with_noise(augmented, labels[batch], generator, recipe.noise_images)
            loss = F.cross_entropy(model(augmented)[0], targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    val_images, val_labels = draw_shapes("val", NUM_VAL_IMAGES)
    logits, features = classify(model, val_images)
    return {"kind": KIND, "recipe": asdict(recipe), "model": model.state_dict(), "val_features": features,
            "val_accuracy": (logits.argmax(1) == val_labels).double().mean().item(),
            "train_seconds": time.perf_counter() - started}


def read_classifier_file(path: str) -> dict:
    """The payload of a classifier file, read with weights_only."""
    payload = load_checkpoint(path)
    if payload.get("kind") != KIND:
        raise CheckpointError(f"{path}: not a shapes classifier file (kind {payload.get('kind')!r}); "
                              f"pass a {CLASSIFIER_FILE} written by the shapes evaluator")
    return payload


def build_classifier(payload: dict, path: str, device: str | torch.device = "cpu") -> ShapesClassifier:
    """The network of a classifier file's payload, in eval mode on `device`."""
    model = ShapesClassifier(payload["recipe"]["width"], payload["recipe"]["feature_dim"])
    strict_load(model, payload["model"], path)
    return model.to(device).eval()


def is_current(payload: dict) -> bool:
    """Whether a file was trained with today's recipe."""
    return payload.get("recipe") == asdict(RECIPE)
