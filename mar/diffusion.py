"""Gaussian diffusion of single tokens: cosine schedule, noise prediction, learned-range variance.

DiffLoss models p(x | z) of one token x (C channels) with a 1000-step DDPM in the improved-DDPM
form used by ADM and DiT: the network predicts the noise and, per channel, a value v in [-1, 1]
that places the reverse step's log-variance between the posterior's (v = -1) and log beta's
(v = 1). Training adds the variational bound (in bits) to the noise MSE so that v is learned.
Sampling may keep only some of the steps ("respacing"): the kept steps get the betas that
preserve their cumulative alphas, and the network is always told the original step.

The per-step tables are float64; a value is looked up in float64 and rounded to float32 before it
multiplies a tensor, so results agree with the reference implementation to float32 rounding.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from common.errors import ConfigError

NUM_STEPS = 1000


def cosine_betas(num_steps: int = NUM_STEPS, max_beta: float = 0.999) -> np.ndarray:
    """beta_i = 1 - abar((i + 1) / T) / abar(i / T) with abar(u) = cos((u + 0.008) / 1.008 * pi / 2)^2, capped
    at max_beta (only the last one reaches the cap)."""
    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                     for i in range(num_steps)])


def linear_betas(num_steps: int = NUM_STEPS) -> np.ndarray:
    """DDPM's betas, evenly from 1e-4 to 0.02 at 1000 steps (both ends scaled by 1000 / num_steps)."""
    scale = 1000 / num_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


# The named schedules of the diffusion code MAR ships; its models use "cosine". The cosine schedule ends at
# abar ~ 2e-9, so the first reverse step multiplies the noise prediction's error at t = 999 by ~1e4 (see
# docs/mar.md): a denoiser trained for minutes needs the linear one (abar ~ 4e-5 at the end) to sample sanely.
BETA_SCHEDULES = {"cosine": cosine_betas, "linear": linear_betas}


def space_timesteps(num_steps: int, spec: str | int) -> list[int]:
    """The steps (ascending) a respacing spec keeps out of `num_steps`.

    "" keeps all; "ddimN" keeps 0, k, 2k, ... for the stride k that gives exactly N steps; otherwise
    comma-separated counts, one per section of near-equal length (the first sections one longer),
    each spread evenly over its section. The spread accumulates its fractional stride in floating
    point and rounds the running sum half-to-even: exact fractions would keep other steps for some
    counts (21, 23, 27, ...), and released models were sampled with these.
    """
    spec = str(spec).strip()
    if spec == "":
        return list(range(num_steps))
    try:
        if spec.startswith("ddim"):
            wanted = int(spec[len("ddim"):])
            for stride in range(1, num_steps):
                if len(range(0, num_steps, stride)) == wanted:
                    return list(range(0, num_steps, stride))
            raise ConfigError(f"num_sampling_steps {spec!r}: no integer stride gives exactly {wanted} of "
                              f"{num_steps} steps")
        counts = [int(part) for part in spec.split(",")]
    except ValueError:
        raise ConfigError(f"num_sampling_steps must be a step count such as '100', comma-separated counts or "
                          f"'ddimN', got {spec!r}") from None
    size, extra = divmod(num_steps, len(counts))
    kept, start = set(), 0
    for i, count in enumerate(counts):
        section = size + (1 if i < extra else 0)
        if not 0 <= count <= section:
            raise ConfigError(f"num_sampling_steps {spec!r}: cannot take {count} steps from a section of {section}")
        stride = (section - 1) / (count - 1) if count > 1 else 1
        position = 0.0
        for _ in range(count):
            kept.add(start + round(position))
            position += stride
        start += section
    return sorted(kept)


class Prediction(NamedTuple):
    """The model's reverse step p(x_{t-1} | x_t): mean, variance, log-variance, and its estimate of x_0."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_xstart: torch.Tensor


class GaussianDiffusion:
    """The diffusion over `timesteps`, a subset of the base schedule (all of it for training)."""

    def __init__(self, timesteps: Sequence[int], base_steps: int = NUM_STEPS, schedule: str = "cosine"):
        self.timestep_map = sorted(set(int(t) for t in timesteps))
        if len(self.timestep_map) < 2:
            raise ConfigError(f"a diffusion needs at least 2 steps, got {len(self.timestep_map)}")
        if schedule not in BETA_SCHEDULES:
            raise ConfigError(f"noise_schedule must be one of {', '.join(BETA_SCHEDULES)}, got {schedule!r}")
        base = np.cumprod(1.0 - BETA_SCHEDULES[schedule](base_steps))
        kept = base[self.timestep_map]
        betas = 1.0 - kept / np.append(1.0, kept[:-1])  # keeps abar at every kept step
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        self.num_steps = len(betas)
        self.betas = betas
        self.alphas_cumprod = abar
        self.log_betas = np.log(betas)
        self.sqrt_alphas_cumprod = np.sqrt(abar)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - abar)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / abar)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / abar - 1)
        self.posterior_variance = variance
        self.posterior_log_variance_clipped = np.log(np.append(variance[1], variance[1:]))  # variance[0] is 0
        self.posterior_mean_coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)
        self.identity_map = self.timestep_map == list(range(self.num_steps))
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}

    @classmethod
    def respaced(cls, spec: str | int, base_steps: int = NUM_STEPS, schedule: str = "cosine") -> "GaussianDiffusion":
        return cls(space_timesteps(base_steps, spec), base_steps, schedule)

    def on_device(self, table: str, device: torch.device) -> torch.Tensor:
        """A table as a tensor on `device` (float32, or int64 for the timestep map), copied there once."""
        key = (table, device)
        if key not in self._on_device:
            values = np.asarray(getattr(self, table))
            self._on_device[key] = torch.from_numpy(values.astype(np.float32 if values.dtype == np.float64
                                                                  else np.int64)).to(device)
        return self._on_device[key]

    def at(self, table: str, t: int | torch.Tensor) -> float | torch.Tensor:
        """table[t] rounded to float32: a number for one step index, a column (N, 1) for one per row."""
        if isinstance(t, int):
            return float(np.float32(getattr(self, table)[t]))
        return self.on_device(table, t.device)[t][:, None]

    def original_step(self, t: torch.Tensor) -> torch.Tensor:
        """Step indices of this diffusion -> the base schedule's steps, which the network is told."""
        return t if self.identity_map else self.on_device("timestep_map", t.device)[t]

    # ------------------------------------------------------------------------------------------
    # Forward process and posterior
    # ------------------------------------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        return self.at("sqrt_alphas_cumprod", t) * x0 + self.at("sqrt_one_minus_alphas_cumprod", t) * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor
                    ) -> tuple[torch.Tensor, float | torch.Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self.at("posterior_mean_coef1", t) * x0 + self.at("posterior_mean_coef2", t) * x_t
        return mean, self.at("posterior_log_variance_clipped", t)

    def p_mean_variance(self, model_out: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor) -> Prediction:
        """The reverse step from the network output (N, 2C) = [noise | v] at x_t (N, C); never clipped. In
        float32 whatever the network's precision: the first steps amplify the noise prediction ~1e4 times."""
        eps, v = model_out.float().split(x_t.shape[1], dim=1)
        min_log = self.at("posterior_log_variance_clipped", t)
        max_log = self.at("log_betas", t)
        frac = (v + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        x0 = self.at("sqrt_recip_alphas_cumprod", t) * x_t - self.at("sqrt_recipm1_alphas_cumprod", t) * eps
        mean, _ = self.q_posterior(x0, x_t, t)
        return Prediction(mean, torch.exp(log_variance), log_variance, x0)

    # ------------------------------------------------------------------------------------------
    # Training: noise MSE + variational bound
    # ------------------------------------------------------------------------------------------

    def training_losses(self, net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                        t: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-row terms (N,) for clean tokens x0 (N, C) at steps t (N,); net(x_t, original step) -> (N, 2C).

        The variational bound sees the predicted noise detached, so it trains only the variance.
        """
        x_t = self.q_sample(x0, t, noise)
        out = net(x_t, self.original_step(t))
        eps, v = out.split(x0.shape[1], dim=1)
        mse = ((noise - eps) ** 2).mean(dim=1)
        vb = self.vb_bits(x0, x_t, t, torch.cat([eps.detach(), v], dim=1))
        return {"mse": mse, "vb": vb, "loss": mse + vb}

    def vb_bits(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, model_out: torch.Tensor
                ) -> torch.Tensor:
        """KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) in bits per channel; at t = 0 the decoder's negative
        log-likelihood of x_0 instead."""
        true_mean, true_log_variance = self.q_posterior(x0, x_t, t)
        pred = self.p_mean_variance(model_out, x_t, t)
        kl = normal_kl(true_mean, true_log_variance, pred.mean, pred.log_variance).mean(dim=1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, pred.mean, 0.5 * pred.log_variance)
        return torch.where(t == 0, nll.mean(dim=1) / math.log(2.0), kl)

    # ------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def p_sample_loop(self, model: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor,
                      step_noise: Callable[[], torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
        """Ancestral sampling from x = x_T (N, C) down to x_0.

        model(x, k) -> (N, 2C) for step index k of this diffusion (it must condition on the original step
        timestep_map[k]). step_noise() gives N(0, I) of x's shape; it is drawn at the last step too, where
        no noise is added, so that a seeded generator advances as in the reference sampler. The temperature
        scales only that per-step noise.
        """
        for k in reversed(range(self.num_steps)):
            pred = self.p_mean_variance(model(x, k), x, k)
            noise = step_noise()
            x = pred.mean + torch.exp(0.5 * pred.log_variance) * noise * temperature if k > 0 else pred.mean
        return x


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor | float, mean2: torch.Tensor,
              logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
                                        ) -> torch.Tensor:
    """log P(x) under a Gaussian discretised into the 256 bins of 8-bit data in [-1, 1] (bins of half-width
    1/255, the outermost ones open-ended). Applied to latents, which are not 8-bit data, as DiffLoss's
    variational bound at t = 0 always was."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
