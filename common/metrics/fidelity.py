"""Scores on Inception features, computed by torch-fidelity's own routines.

FID statistics are `mu` (D,) and `sigma` (D, D) as torch-fidelity makes them (mean, and
`np.cov` with N - 1); we hold them in float64, so a statistics file written in any float
type compares with freshly computed statistics (torch-fidelity's Fréchet routine insists on
equal dtypes). A statistics file is an `.npz` with keys `mu` and `sigma`: the official RQ-VAE
`fid_stats/*.npz`, MAR's `adm_in256_stats.npz`, an ADM reference batch, or one written by
`FIDStatistics.save`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import IO, Callable

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

from common.errors import DataError

IS_SPLITS = 10  # torch-fidelity's and the official repositories' default
IS_SHUFFLE_SEED = 2020  # torch-fidelity's default: split membership is a fixed permutation
PRC_NEIGHBORHOOD = 3  # k of the k-NN balls (Kynkäänniemi et al.; ADM evaluator)
MIN_IMAGES = {"fid": 2, "isc": IS_SPLITS, "prc": PRC_NEIGHBORHOOD + 1}  # a covariance; one per split; k + 1 points
METRIC_NAMES = {"fid": "FID", "isc": "the Inception Score", "prc": "precision/recall"}


def check_image_count(metric: str, count: int, what: str) -> None:
    """DataError unless `count` images are enough for `metric` ("fid", "isc" or "prc")."""
    if count < MIN_IMAGES[metric]:
        raise DataError(f"{what}: {METRIC_NAMES[metric]} needs at least {MIN_IMAGES[metric]} images, got {count}")


def check_feature_dims(dim_a: int, what_a: str, dim_b: int, what_b: str) -> None:
    if dim_a != dim_b:
        raise DataError(f"feature dimensions differ: {what_a} has {dim_a}-d features, {what_b} {dim_b}-d; "
                        "both must come from the Inception 2048-d pool features")


def write_atomic(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file through a temporary file and a rename, so a crash never leaves half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@dataclass
class FIDStatistics:
    """Mean and covariance of one image set's Inception pool features."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    num_images: int | None = None  # None when a file does not say
    source: str = ""

    @property
    def dim(self) -> int:
        return self.mu.shape[0]

    @classmethod
    def from_features(cls, features: torch.Tensor, source: str = "") -> FIDStatistics:
        """Statistics of (N, D) features; N >= 2 (a covariance needs two images)."""
        check_image_count("fid", features.shape[0], source)
        stats = fid_features_to_statistics(features.detach().float().cpu())
        return cls(stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64), features.shape[0], source)

    def save(self, path: str) -> None:
        """Write `mu`, `sigma` (and `num_images`) to an `.npz`, atomically."""
        arrays = {"mu": self.mu, "sigma": self.sigma}
        if self.num_images is not None:
            arrays["num_images"] = np.array(self.num_images)
        write_atomic(path, lambda handle: np.savez(handle, **arrays))


def npz_keys(path: str) -> list[str]:
    """The array names in an `.npz`, or a DataError saying the file cannot be read."""
    try:
        archive = np.load(path)
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read as .npz ({error})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: not an .npz archive (a single array?); "
                        "expected named arrays such as mu/sigma or arr_0")
    with archive:
        return list(archive.files)


def load_statistics(path: str) -> FIDStatistics:
    """Read an `.npz` with `mu` (D,) and `sigma` (D, D); anything else is a DataError naming the file."""
    keys = npz_keys(path)
    if "mu" not in keys or "sigma" not in keys:
        raise DataError(f"{path}: a statistics file needs arrays 'mu' and 'sigma', found {keys}; "
                        "write one with compute_metrics.py --fake FOLDER --save-stats OUT.npz")
    with np.load(path) as archive:
        mu, sigma = archive["mu"].astype(np.float64), archive["sigma"].astype(np.float64)
        num_images = int(archive["num_images"]) if "num_images" in keys else None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise DataError(f"{path}: 'mu' must be (D,) and 'sigma' (D, D), got {mu.shape} and {sigma.shape}")
    return FIDStatistics(mu, sigma, num_images, path)


def frechet_distance(a: FIDStatistics, b: FIDStatistics) -> float:
    """FID between two sets of statistics (torch-fidelity's Fréchet distance)."""
    check_feature_dims(a.dim, a.source, b.dim, b.source)
    metric = fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma}, verbose=False)
    return metric[KEY_METRIC_FID]


def inception_score(logits: torch.Tensor, splits: int = IS_SPLITS) -> tuple[float, float]:
    """Mean and std over `splits` splits of exp(E KL(p(y|x) || p(y))), from (N, 1008) logits."""
    if logits.shape[0] < splits:
        raise DataError(f"the Inception Score with {splits} splits needs at least {splits} images, "
                        f"got {logits.shape[0]}")
    metric = isc_features_to_metric(logits.detach().cpu(), splits=splits, shuffle=True, rng_seed=IS_SHUFFLE_SEED)
    return metric[KEY_METRIC_ISC_MEAN], metric[KEY_METRIC_ISC_STD]


def precision_recall(fake: torch.Tensor, real: torch.Tensor,
                     neighborhood: int = PRC_NEIGHBORHOOD) -> tuple[float, float]:
    """Improved precision and recall of (N, D) generated features against (M, D) real features.

    Distances run on the features' device (pass CUDA tensors for 50k images), batched so memory stays small.
    """
    for name, features in (("generated", fake), ("reference", real)):
        if features.shape[0] <= neighborhood:
            raise DataError(f"{name} images: precision/recall with k = {neighborhood} needs more than {neighborhood} "
                            f"images, got {features.shape[0]}")
    check_feature_dims(fake.shape[1], "the generated images", real.shape[1], "the reference images")
    metric = prc_features_to_metric(fake, real, prc_neighborhood=neighborhood, prc_batch_size=10000,
                                    save_cpu_ram=True, verbose=False)
    return metric[KEY_METRIC_PRECISION], metric[KEY_METRIC_RECALL]
