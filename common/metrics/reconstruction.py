"""Reconstruction metrics of a tokenizer: PSNR, SSIM, LPIPS and codebook usage.

`psnr` and `ssim` take uint8 images or float images in [0, 1], NCHW RGB, and compute in
float64 with data range 1 (uint8 values are divided by 255). Both return one value per
image; the number reported for a data set is their mean over images.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from common import dist
from common.data import to_uint8
from common.errors import DataError
from common.metrics.inception import InceptionAccumulator

SSIM_K1, SSIM_K2 = 0.01, 0.03


def unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float64 / 255; float images are taken to be in [0, 1] already."""
    if images.dtype == torch.uint8:
        return images.double() / 255
    return images.double()


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, 10 log10(1 / MSE), MSE over C×H×W; inf for identical images. (B,)

    Open-MAGVIT2's evaluation.py reports a batch-level PSNR instead (one MSE over its whole
    batch of 4); `psnr(x.reshape(1, -1, H, W), y.reshape(1, -1, H, W))` per batch reproduces it.
    """
    mse = (unit_range(x) - unit_range(y)).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1 / mse)


def ssim_window(window: str) -> tuple[torch.Tensor, float]:
    """1-D taps of the separable SSIM window and the covariance normalisation it goes with."""
    if window == "gaussian":  # Wang et al. 2004: 11 taps, sigma 1.5, population (co)variances
        taps = torch.exp(-(torch.arange(11, dtype=torch.float64) - 5) ** 2 / (2 * 1.5 ** 2))
        return taps / taps.sum(), 1.0
    if window == "uniform":  # scikit-image defaults: 7x7 box, sample (co)variances
        return torch.full((7,), 1 / 7, dtype=torch.float64), 49 / 48
    raise ValueError(f"unknown SSIM window {window!r}; use 'gaussian' or 'uniform'")


def ssim(x: torch.Tensor, y: torch.Tensor, window: str = "gaussian") -> torch.Tensor:
    """Per-image SSIM (mean over channels and over the window positions inside the image). (B,)

    "gaussian" (default): 11×11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, as pytorch-msssim
    and scikit-image `structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1)`. "uniform": scikit-image's defaults (7×7 box
    window, sample covariance), what Open-MAGVIT2's evaluation.py reports.
    """
    taps, cov_norm = ssim_window(window)
    size = taps.numel()
    if min(x.shape[-2:]) < size:
        raise DataError(f"SSIM with the {window} window needs images of at least {size}x{size}, got "
                        f"{tuple(x.shape[-2:])}")
    x, y = unit_range(x), unit_range(y)
    batch, channels = x.shape[:2]
    maps = torch.stack([x, y, x * x, y * y, x * y]).flatten(0, 2).unsqueeze(1)  # (5*B*C, 1, H, W)
    taps = taps.to(x.device)
    maps = F.conv2d(maps, taps.view(1, 1, size, 1))
    maps = F.conv2d(maps, taps.view(1, 1, 1, size))  # (5*B*C, 1, H-size+1, W-size+1): valid positions only
    mu_x, mu_y, xx, yy, xy = maps.view(5, batch, channels, *maps.shape[-2:])
    var_x, var_y = cov_norm * (xx - mu_x * mu_x), cov_norm * (yy - mu_y * mu_y)
    cov_xy = cov_norm * (xy - mu_x * mu_y)
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    similarity = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return similarity.flatten(1).mean(dim=1)


def code_counts(codes: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """How often each code index occurs in an integer tensor of any shape. (vocab_size,) int64"""
    codes = codes.flatten().long()
    if codes.numel() and (codes.min() < 0 or codes.max() >= vocab_size):
        raise DataError(f"code indices span [{int(codes.min())}, {int(codes.max())}], outside a vocabulary of "
                        f"{vocab_size}; check vocab_size")
    return torch.bincount(codes, minlength=vocab_size)


def usage_from_counts(counts: torch.Tensor) -> dict[str, float]:
    """usage = fraction of the vocabulary used at least once; perplexity = exp(entropy of the code frequencies)."""
    total = counts.sum()
    if total == 0:
        raise DataError("codebook usage of an empty set of codes")
    probs = counts[counts > 0].double() / total
    return {"usage": (counts > 0).sum().item() / counts.numel(), "perplexity": math.exp(-(probs * probs.log()).sum())}


def codebook_usage(codes: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """Usage and perplexity of the codes in one tensor (sum `code_counts` over batches for a data set)."""
    return usage_from_counts(code_counts(codes, vocab_size))


class ReconstructionMeter:
    """Running means of PSNR, SSIM (Gaussian window) and LPIPS over a data set, across ranks.

    `update(real, fake)` takes float images in [-1, 1]; PSNR and SSIM see them rounded to uint8
    as saved samples are, LPIPS sees them clamped to [-1, 1]. `compute` is collective under torchrun.
    """

    def __init__(self, lpips: nn.Module | None = None, device: str | torch.device = "cpu"):
        self.lpips = lpips
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # psnr, ssim, lpips, count

    @torch.no_grad()
    def update(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        real_u8, fake_u8 = (to_uint8(images).permute(0, 3, 1, 2).to(real.device) for images in (real, fake))
        self.sums[0] += psnr(real_u8, fake_u8).sum().item()
        self.sums[1] += ssim(real_u8, fake_u8).sum().item()
        if self.lpips is not None:
            self.sums[2] += self.lpips(real.clamp(-1, 1), fake.clamp(-1, 1)).double().sum().item()
        self.sums[3] += real.shape[0]

    def compute(self) -> dict[str, float]:
        """{"psnr", "ssim", ("lpips",) "num_images"} over all ranks."""
        psnr_sum, ssim_sum, lpips_sum, count = dist.all_reduce_sum(self.sums.clone()).tolist()
        if count == 0:
            raise DataError("no reconstructions were measured")
        result = {"psnr": psnr_sum / count, "ssim": ssim_sum / count, "num_images": int(count)}
        if self.lpips is not None:
            result["lpips"] = lpips_sum / count
        return result


@torch.no_grad()
def reconstruction_metrics(model, loader, env: dist.DistEnv, inception=None, lpips=None,
                           desc: str = "reconstruct") -> dict:
    """rFID (when an Inception network is given), PSNR, SSIM, LPIPS (when given) and, for a tokenizer with a
    codebook, per-depth codebook usage, over a loader of {"image"} batches; collective under torchrun."""
    real = InceptionAccumulator(inception, "originals") if inception is not None else None
    fake = InceptionAccumulator(inception, "reconstructions") if inception is not None else None
    meter = ReconstructionMeter(lpips, env.device)
    counts = None
    for batch in tqdm(loader, desc=desc, disable=not env.is_main):
        x = batch["image"].to(env.device)
        recon, codes = model.reconstruct(x)
        recon = recon.clamp(-1, 1)
        if real is not None:
            real.add(x)
            fake.add(recon)
        meter.update(x, recon)
        if codes is not None:  # a continuous tokenizer has no codebook to count
            depth_codes = codes if codes.ndim == 4 else codes.unsqueeze(-1)  # (B, h, w, D); D = 1 without depth
            batch_counts = torch.stack([code_counts(depth_codes[..., d], model.vocab_size)
                                        for d in range(depth_codes.shape[-1])])
            counts = batch_counts if counts is None else counts + batch_counts
    results = {"rfid": fake.fid(real)} if real is not None else {}
    results.update(meter.compute())
    if counts is not None:
        counts = dist.all_reduce_sum(counts.to(env.device)).cpu()
        for depth, depth_counts in enumerate(counts):
            results.update({f"{k}_d{depth}": v for k, v in usage_from_counts(depth_counts).items()})
    return results
