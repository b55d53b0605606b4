"""Scores of generated and reconstructed shapes in the feature space of the built-in shapes classifier.

Not Inception: the classifier (`common.metrics.shapes_classifier`) is trained here on the built-in
shapes, so these scores need no download and mean something for 32x32 shapes, where Inception
features of upsampled toys mean little. Against the whole shapes val split (1,000 images):
- `shapes_accuracy`: fraction of images classified as their intended class (needs labels);
- `shapes_fd`: Fréchet distance of the 128-d penultimate features (torch-fidelity's routine);
- `shapes_precision` / `shapes_recall`: k-NN manifold precision and recall (k = 3) of those features;
- `shapes_rfd`: Fréchet distance between reconstructions and their originals.
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from common.checkpoint import save_checkpoint
from common.data import ShapesDataset
from common.errors import CheckpointError, DataError
from common.metrics.fidelity import FIDStatistics, frechet_distance, npz_keys, precision_recall
from common.metrics.images import NpzImages
from common.metrics.shapes_classifier import (CLASSIFIER_FILE, NUM_CLASSES, NUM_VAL_IMAGES, ShapesClassifier,
                                              build_classifier, classify, is_current, read_classifier_file,
                                              train_classifier)
from common.paths import default_cache_dir

LABEL_KEYS = ("labels", "arr_1")  # main_sampling_fid.py writes both; arr_1 is ADM's name
CLASS_NAMES = ShapesDataset.class_names


class ShapesEvaluator:
    """The shapes classifier with the features of the shapes val split, ready to score image sets.

    Images are (N, 3, 32, 32): uint8, or floats in [-1, 1] (rounded to uint8 first, as saved samples are).
    """

    def __init__(self, model: ShapesClassifier, payload: dict, path: str):
        self.model, self.path = model, path
        self.val_accuracy: float = payload["val_accuracy"]
        self.reference_features = payload["val_features"].float()  # (1000, 128)
        self.reference = f"shapes val ({len(self.reference_features)} images)"
        self.reference_stats = FIDStatistics.from_features(self.reference_features, self.reference)

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu") -> ShapesEvaluator:
        """The evaluator of a classifier file."""
        payload = read_classifier_file(path)
        return cls(build_classifier(payload, path, device), payload, path)

    @classmethod
    def load_or_train(cls, cache_dir: str | None = None, device: str | torch.device = "cpu") -> ShapesEvaluator:
        """The cached classifier of `cache_dir` (default $ARGEN_CACHE, else ~/.cache/argen), trained there
        first when it is missing or was trained with another recipe (about 20 s on 2 CPU cores)."""
        path = os.path.join(cache_dir or default_cache_dir(), CLASSIFIER_FILE)
        if os.path.isfile(path):
            payload = read_classifier_file(path)
            if is_current(payload):
                return cls(build_classifier(payload, path, device), payload, path)
            print(f"{path} was trained with another recipe: training it again", flush=True)
        print(f"training the shapes classifier once (cached at {path})", flush=True)
        payload = train_classifier()
        try:
            save_checkpoint(path, payload)
        except OSError as error:
            raise CheckpointError(f"cannot write the shapes classifier to {path} ({error.strerror}); "
                                  "set ARGEN_CACHE (or --cache-dir) to a writable folder") from None
        print(f"shapes classifier: held-out accuracy {payload['val_accuracy']:.4f} on {NUM_VAL_IMAGES} shapes val "
              f"images, trained in {payload['train_seconds']:.0f} s", flush=True)
        return cls(build_classifier(payload, path, device), payload, path)

    def describe(self) -> str:
        return (f"shapes classifier {self.path} (held-out accuracy {self.val_accuracy:.4f}, "
                f"{self.reference_features.shape[1]}-d features; not Inception)")

    def score(self, images: torch.Tensor, labels: torch.Tensor | Sequence[int] | None = None) -> dict[str, float]:
        """shapes_accuracy (with labels), shapes_fd, shapes_precision, shapes_recall of N >= 4 images."""
        logits, features = classify(self.model, images)
        results = {}
        if labels is not None:
            labels = check_labels(labels, images.shape[0], "labels")
            results["shapes_accuracy"] = (logits.argmax(1) == labels).double().mean().item()
        results["shapes_fd"] = frechet_distance(FIDStatistics.from_features(features, "generated images"),
                                                self.reference_stats)
        results["shapes_precision"], results["shapes_recall"] = precision_recall(features, self.reference_features)
        return results

    def score_reconstructions(self, reconstructions: torch.Tensor, originals: torch.Tensor,
                              labels: torch.Tensor | Sequence[int] | None = None) -> dict[str, float]:
        """shapes_rfd: Fréchet distance between the features of reconstructions and of their originals; with the
        originals' labels also shapes_recon_accuracy, how often the reconstruction still shows its class (a prior
        on this tokenizer's tokens cannot draw shapes better than that)."""
        (recon_logits, recon_features), (_, original_features) = (classify(self.model, reconstructions),
                                                                  classify(self.model, originals))
        scores = {"shapes_rfd": frechet_distance(FIDStatistics.from_features(recon_features, "reconstructions"),
                                                 FIDStatistics.from_features(original_features, "originals"))}
        if labels is not None:
            labels = check_labels(labels, len(reconstructions), "reconstructions")
            scores["shapes_recon_accuracy"] = (recon_logits.argmax(1) == labels).double().mean().item()
        return scores


def check_labels(labels: torch.Tensor | Sequence[int], count: int, source: str) -> torch.Tensor:
    """Class labels as a (count,) int64 tensor in [0, 10), or a DataError naming `source`."""
    labels = torch.as_tensor(labels).cpu().long().flatten()
    if labels.numel() != count:
        raise DataError(f"{source}: {labels.numel()} labels for {count} images")
    if count and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{source}: class labels span [{int(labels.min())}, {int(labels.max())}]; "
                        f"shapes classes are 0 to {NUM_CLASSES - 1}")
    return labels


def label_from_name(relative_path: str) -> int | None:
    """The class a file's name gives: its folder (`star/00012.png`, `7/00012.png`) or its first word
    (`star_00012.png`); None when neither names a class."""
    folder, name = os.path.split(relative_path)
    folder_name = os.path.basename(folder).lower()
    if folder_name.isdigit():
        return int(folder_name)
    for word in (folder_name, re.split(r"[_\-.]", name)[0].lower()):
        if word in CLASS_NAMES:
            return CLASS_NAMES.index(word)
    return None


def sample_labels(path: str, images: Dataset) -> tuple[torch.Tensor | None, str]:
    """The intended classes of an image set (see `open_images`) and where they were found.

    An `.npz` gives them as `labels` (or `arr_1`); a folder in its file names (`label_from_name`),
    which must then name a class for every file. None when there are none.
    """
    if isinstance(images, NpzImages):
        key = next((key for key in LABEL_KEYS if key in npz_keys(path)), None)
        if key is None:
            return None, f"none ({path} has no {' or '.join(LABEL_KEYS)} array)"
        with np.load(path) as archive:
            return check_labels(archive[key], len(images), f"{path} '{key}'"), f"{path} '{key}'"
    found = [label_from_name(os.path.relpath(file, path)) for file in images.paths]
    unnamed = [file for file, label in zip(images.paths, found) if label is None]
    if len(unnamed) == len(found):
        return None, "none (no class in the file names)"
    if unnamed:
        raise DataError(f"{unnamed[0]}: no class in its name while other files have one; name every file "
                        f"<class>_*.png or put it in a <class>/ folder (a name such as {CLASS_NAMES[0]}, or 0-9)")
    return check_labels(found, len(found), path), "file names"
