"""What a FID reference names: a statistics file, a folder or ADM batch of images, or a dataset name.

Named references are statistics files looked up under a folder (`--stats-dir`, default
`assets/fid_stats`): the RQ-VAE release's `fid_stats.tar.gz` files and MAR's `adm_in256_stats.npz`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from torch.utils.data import Dataset

from common.errors import DataError
from common.metrics.fidelity import FIDStatistics, load_statistics, npz_keys
from common.metrics.images import NpzImages, open_images

DEFAULT_STATS_DIR = os.path.join("assets", "fid_stats")
REFERENCE_STATS = {  # ref_dataset name -> statistics file under --stats-dir
    "imagenet": "imagenet_256_train.npz",  # the official RQ-VAE fid_stats.tar.gz
    "ffhq": "ffhq_256_train.npz",
    "lsun_bedroom": "lsun_256_bedroom.npz",
    "lsun_cat": "lsun_256_cat.npz",
    "lsun_church": "lsun_256_church.npz",
    "cc3m": "cc3m_256_val.npz",
    "coco_2014val": "coco_256_val.npz",
    "adm_in256": "adm_in256_stats.npz",  # MAR's fid_stats/adm_in256_stats.npz
}
STATS_SOURCES = ("the RQ-VAE files come in fid_stats.tar.gz (kakaobrain/rq-vae-transformer README); "
                 "adm_in256_stats.npz is in LTH14/mar under fid_stats/")


@dataclass
class Reference:
    """What --ref names: precomputed statistics, images, or both (an ADM reference batch)."""

    path: str
    stats: FIDStatistics | None = None
    images: Dataset | None = None

    @property
    def description(self) -> str:
        if self.stats is None:
            return f"{self.path} (images)"
        return f"{self.path} (mu/sigma" + (f", {self.stats.num_images} images)" if self.stats.num_images else ")")


def resolve_reference(ref: str, stats_dir: str) -> Reference:
    """Open --ref: a path, or a ref_dataset name resolved to a statistics file under `stats_dir`."""
    path = ref
    if not os.path.exists(path):
        if ref not in REFERENCE_STATS:
            raise DataError(f"--ref {ref}: no such file or folder, and not a reference name "
                            f"({', '.join(REFERENCE_STATS)})")
        path = os.path.join(stats_dir, REFERENCE_STATS[ref])
        if not os.path.isfile(path):
            raise DataError(f"reference statistics for {ref} not found at {path}: put {REFERENCE_STATS[ref]} "
                            f"in {stats_dir} or pass --stats-dir DIR; {STATS_SOURCES}")
    if os.path.isdir(path):
        return Reference(path, images=open_images(path))
    keys = npz_keys(path)
    if "arr_0" in keys and not {"mu", "sigma"} <= set(keys):
        return Reference(path, images=NpzImages(path))
    images = NpzImages(path) if "arr_0" in keys else None  # an ADM reference batch: stats for FID, images for PRC
    return Reference(path, stats=load_statistics(path), images=images)
