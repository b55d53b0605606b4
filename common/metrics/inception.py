"""torch-fidelity's Inception-v3 ("inception-v3-compat") and streaming, sharded feature extraction.

The network is torch-fidelity's port of the TensorFlow FID graph (2015-12-05): uint8 images in,
TF1-compatible bilinear resize to 299 inside, 2048-d pool features for FID and precision/recall,
1008 unbiased logits for the Inception Score. Its weights are read from a local file only, as data
(`weights_only`): never through torch-fidelity's own loading, which unpickles the file in full.
Under torchrun each rank extracts a contiguous shard; `InceptionAccumulator.gather` returns
the features of all ranks in dataset order.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from tqdm import tqdm

from common import dist
from common.data import to_uint8
from common.checkpoint import load_file, weight_mismatches
from common.errors import CheckpointError, DataError, WeightsError
from common.metrics.fidelity import FIDStatistics, frechet_distance, inception_score
from common.weights import find_weights

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = URL_INCEPTION_V3
INCEPTION_NAME = "inception-v3-compat"
POOL, LOGITS = "2048", "logits_unbiased"  # FID / precision-recall features, Inception Score logits
POOL_DIM, LOGITS_DIM = 2048, 1008


def find_inception_weights(explicit_path: str | None = None, flag: str = "--inception-weights") -> str:
    """Path of the local Inception weights (explicit, or torch's hub cache); else a WeightsError saying where
    to get them."""
    return find_weights(INCEPTION_FILE, explicit_path, INCEPTION_URL, flag)


class _UnloadedInception(FeatureExtractorInceptionV3):
    """The network without torch-fidelity's loading: its constructor reads a weights file with full pickle, so
    it is handed an empty file of ours, whose load is skipped here; weights come in as checked tensors."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        if not state_dict:  # the constructor's load of our empty file
            return None
        return super().load_state_dict(state_dict, strict, assign)


def inception_network() -> FeatureExtractorInceptionV3:
    """torch-fidelity's Inception with its initial (untrained) weights; no file of the user's is read."""
    with tempfile.TemporaryDirectory() as scratch:
        empty = os.path.join(scratch, "empty.pth")
        torch.save({}, empty)
        return _UnloadedInception(INCEPTION_NAME, [POOL, LOGITS], feature_extractor_weights_path=empty)


def load_inception(weights_path: str, device: str | torch.device = "cpu") -> FeatureExtractorInceptionV3:
    """torch-fidelity's Inception with the given weights file, in eval mode on `device`.

    The file is read as data only (`weights_only`, as every checkpoint here) and its tensors are checked
    against the network before they are loaded: torch-fidelity itself would unpickle it in full.
    """
    expected = f"expected {INCEPTION_FILE} from {INCEPTION_URL}"
    try:
        state = load_file(weights_path)
    except CheckpointError as error:
        raise WeightsError(f"{error}; {expected}") from None
    network = inception_network()
    problems = (weight_mismatches(network.state_dict(), state) if isinstance(state, Mapping)
                else [f"a {type(state).__name__}, not a state dict"])
    if problems:
        raise WeightsError(f"{weights_path}: not torch-fidelity's Inception weights ({problems[0]}); {expected}")
    network.load_state_dict(state)
    return network.eval().to(device)


def write_random_inception_weights(path: str, seed: int = 0) -> str:
    """Save random Inception weights in torch-fidelity's file layout. For tests and speed benchmarks only:
    scores computed with them mean nothing."""
    state = inception_network().state_dict()
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in state.items():
        if name.endswith("conv.weight") or name == "fc.weight":  # He init keeps activations O(1) through 90 layers
            gain = 20.0 if name == "fc.weight" else 1.0  # logits of a few units, so the Inception Score is not ~1
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * gain * (2.0 / tensor[0].numel()) ** 0.5)
    torch.save(state, path)
    return path


@contextmanager
def tf32_allowed(allowed: bool) -> Iterator[None]:
    """Allow or forbid TF32 convolutions and matmuls on CUDA inside the block; restore the settings after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class InceptionAccumulator:
    """Inception features of one image set, added batch by batch (per rank) and gathered on demand.

    `add` takes uint8 images or float images in [-1, 1] (rounded to uint8 as samples are saved),
    NCHW RGB. The network runs in exact fp32: TF32 is off inside `add` unless `tf32=True`, so scores
    do not depend on a global TF32 switch of the calling script (PyTorch allows TF32 convolutions by
    default). `gather`, `statistics`, `fid` and `inception_score` are collective under torchrun:
    every rank must call them.
    """

    def __init__(self, extractor: FeatureExtractorInceptionV3, name: str = "images", tf32: bool = False):
        self.extractor, self.name, self.tf32 = extractor, name, tf32
        self.device = next(extractor.parameters()).device
        self.chunks: dict[str, list[torch.Tensor]] = {POOL: [], LOGITS: []}
        self.gathered: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        """Images added on this rank."""
        return sum(chunk.shape[0] for chunk in self.chunks[POOL])

    @torch.no_grad()
    def add(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8:
            images = to_uint8(images).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        with tf32_allowed(self.tf32):
            pool, logits = self.extractor(images.to(self.device))  # (B, 2048), (B, 1008)
        self.chunks[POOL].append(pool.float().cpu())
        self.chunks[LOGITS].append(logits.float().cpu())
        self.gathered = None

    def gather(self) -> dict[str, torch.Tensor]:
        """{"2048": (N, 2048), "logits_unbiased": (N, 1008)} over all ranks, rank 0's images first."""
        if self.gathered is None:
            self.gathered = {}
            for layer, chunks in self.chunks.items():
                local = torch.cat(chunks) if chunks else torch.zeros(0, POOL_DIM if layer == POOL else LOGITS_DIM)
                self.gathered[layer] = dist.all_gather_cat(local.to(self.device)).cpu()
        return self.gathered

    def statistics(self) -> FIDStatistics:
        return FIDStatistics.from_features(self.gather()[POOL], self.name)

    def fid(self, reference: InceptionAccumulator | FIDStatistics) -> float:
        if isinstance(reference, InceptionAccumulator):
            reference = reference.statistics()
        return frechet_distance(self.statistics(), reference)

    def inception_score(self) -> tuple[float, float]:
        return inception_score(self.gather()[LOGITS])


def shard(dataset: Dataset, rank: int, world_size: int) -> Subset:
    """Rank `rank`'s contiguous share of `dataset` (shares differ by at most one item)."""
    total = len(dataset)
    return Subset(dataset, range(total * rank // world_size, total * (rank + 1) // world_size))


def extract_features(dataset: Dataset, accumulator: InceptionAccumulator, env: dist.DistEnv, batch_size: int = 64,
                     num_workers: int = 4, desc: str = "Inception features") -> int:
    """Feed this rank's shard of an image set (see common.metrics.images) to `accumulator`.

    Shows a progress bar on rank 0. Returns the number of images resized to the set's size, over all ranks;
    an unreadable image is a DataError on every rank (after the loop, so no rank is left waiting).
    """
    part = shard(dataset, env.rank, env.world_size)
    loader = DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=env.device.type == "cuda")
    resized, errors = 0, []
    with tqdm(total=len(part), desc=desc, unit="img", disable=not env.is_main, leave=False) as progress:
        for batch in loader:
            errors = [error for error in batch["error"] if error]
            if errors:
                break
            accumulator.add(batch["image"])
            resized += int(batch["resized"].sum())
            progress.update(len(batch["error"]))
    counts = dist.all_reduce_sum(torch.tensor([resized, len(errors)], device=env.device))
    if counts[1] > 0:
        raise DataError(errors[0] if errors else
                        f"{int(counts[1])} unreadable images on other ranks (see their messages)")
    return int(counts[0])
