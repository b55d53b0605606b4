"""Next-patch prediction's schedules: the patch size of each epoch and the segment-wise learning rate.

Training runs in K stages from coarse to fine; stage i ends at epoch int(E * r^(K-1-i)), so the
last (token-level) stage ends at E. With the NPP learning-rate schedule every stage is a segment
of its own: linear warm-up from zero, a constant phase, then a linear decay to `end_lr` over the
segment's last `decay_ratio`.
"""
from __future__ import annotations

import bisect
import math

from common.errors import ConfigError

STAGE_PATCH_SIZES = {2: [4, 1], 3: [16, 4, 1], 4: [64, 16, 4, 1]}  # tokens per patch, coarse to fine


def patch_plan(epochs: int, patch_level: int, epoch_rate: float) -> tuple[list[int], list[int]]:
    """(patch sizes, the epoch each stage ends at) for K = patch_level stages; K <= 1 is token level only."""
    if patch_level > 4:
        raise ConfigError(f"npp.patch_level {patch_level}: at most 4 stages (patches of 64, 16, 4 and 1 tokens)")
    sizes = STAGE_PATCH_SIZES.get(patch_level, [1])
    ends = [int(epochs * epoch_rate ** (len(sizes) - 1 - i)) for i in range(len(sizes))]
    return sizes, ends


def patch_side(epoch: int, plan: tuple[list[int], list[int]]) -> int:
    """Side of the square patches trained at `epoch` (0-based): 1 is token level."""
    sizes, ends = plan
    stage = min(bisect.bisect_right(ends, epoch), len(sizes) - 1)
    return math.isqrt(sizes[stage])


def segment_lr_multiplier(step: int, steps_per_epoch: int, plan: tuple[list[int], list[int]], warmup_epochs: float,
                          decay_ratio: float, base_lr: float, end_lr: float) -> float:
    """The learning rate at optimizer step `step` over `base_lr` (past the last step it stays at end_lr)."""
    _, ends = plan
    starts = [0] + ends[:-1]
    segment = min(bisect.bisect_right(ends, step // steps_per_epoch), len(ends) - 1)
    start, length = starts[segment] * steps_per_epoch, (ends[segment] - starts[segment]) * steps_per_epoch
    warmup = warmup_epochs * steps_per_epoch
    decay = decay_ratio * length
    constant = length - warmup - decay
    into = step - start
    if into < warmup:
        return into / max(1, warmup)
    if into < warmup + constant:
        return 1.0
    progress = min(1.0, (into - warmup - constant) / decay) if decay > 0 else 1.0
    return (end_lr + (base_lr - end_lr) * (1 - progress)) / base_lr
