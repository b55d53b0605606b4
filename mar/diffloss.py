"""DiffLoss: a small denoising MLP that models each token given the transformer's output for it.

`SimpleMLPAdaLN` predicts the noise (and the variance interpolation v) of a noisy token x_t from
its step t and the conditioning vector z: z and t are embedded and summed into y, which modulates
(adaLN shift / scale / gate) a stack of residual MLP blocks. `DiffLoss` trains it with the
diffusion loss of mar/diffusion.py and samples tokens with ancestral sampling, optionally with
classifier-free guidance on the predicted noise. Module names follow the released state dicts
(prefix `diffloss.net.` inside MAR).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mar.diffusion import NUM_STEPS, GaussianDiffusion


# Rows of x_t-independent adaLN modulation computed per matrix product when sampling: a few tokens' rows alone
# leave a CPU's matrix units mostly idle, so several diffusion steps share one product (about 80 MB for MAR-B)
MODULATION_ROWS = 1024


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Integer steps (N,) -> (N, width): a sinusoidal [cos | sin] embedding of the step, then an MLP."""

    def __init__(self, width: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    @staticmethod
    def frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(N, dim): cos(t f_i) then sin(t f_i) with f_i = max_period^(-i / (dim/2)), the step never rescaled."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.frequencies(t, self.frequency_dim))


class ResBlock(nn.Module):
    """h + gate * MLP(LayerNorm(h) * (1 + scale) + shift), with (shift, scale, gate) from y."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return h + gate * self.mlp(modulate(self.in_ln(h), shift, scale))

    def modulated_(self, h: torch.Tensor, shift: torch.Tensor, scale_plus_one: torch.Tensor, gate: torch.Tensor
                   ) -> torch.Tensor:
        """`forward` with the modulation given (scale already plus one), overwriting h; no autograd. The same
        float operations in the same order, so the result is bit-identical, without a fresh tensor per step."""
        u = self.in_ln(h).mul_(scale_plus_one).add_(shift)
        u = F.silu(self.mlp[0](u), inplace=True)
        return h.add_(self.mlp[2](u).mul_(gate))


class FinalLayer(nn.Module):
    """Affine-free LayerNorm modulated by (shift, scale) from y, then the output projection."""

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(h), shift, scale))

    def modulated(self, h: torch.Tensor, shift: torch.Tensor, scale_plus_one: torch.Tensor) -> torch.Tensor:
        """`forward` with the modulation given (scale already plus one), bit-identical; no autograd."""
        return self.linear(self.norm_final(h).mul_(scale_plus_one).add_(shift))


class SimpleMLPAdaLN(nn.Module):
    """(x_t (N, C), original step t (N,), condition z (N, D)) -> (N, 2C): the predicted noise, then v."""

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, z_channels: int,
                 num_res_blocks: int, grad_checkpointing: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.grad_checkpointing = grad_checkpointing
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList(ResBlock(model_channels) for _ in range(num_res_blocks))
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier-uniform Linears with zero bias, N(0, 0.02) time MLP, and zero modulation and output layers,
        so that a fresh network predicts exactly 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for layer in [block.adaLN_modulation[-1] for block in self.res_blocks] + [
                self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.denoise(x, self.time_embed(t) + self.cond_embed(z))

    def denoise(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The network after the embeddings: x_t (N, C) and y = time + condition embedding (N or 1, W)."""
        h = self.input_proj(x)  # (N, W)
        for block in self.res_blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, y, use_reentrant=False)
            else:
                h = block(h, y)
        return self.final_layer(h, y)

    def modulations(self, y: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """y = time + condition embedding (N, W) -> per res block (shift, 1 + scale, gate), then the final layer's
        (shift, 1 + scale), each (N, W): all the blocks take from y, none of which depends on x_t."""
        y = F.silu(y)  # every adaLN_modulation starts with it
        parts = []
        for layer in [block.adaLN_modulation[-1] for block in self.res_blocks] + [
                self.final_layer.adaLN_modulation[-1]]:
            shift, scale, *gate = layer(y).chunk(layer.out_features // y.shape[1], dim=-1)
            parts.append((shift, scale.add_(1), *gate))
        return parts

    def denoise_modulated(self, x: torch.Tensor, modulations: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """`denoise` with the modulations computed beforehand (`modulations`, rows as x); no autograd."""
        h = self.input_proj(x)  # (N, W)
        for block, (shift, scale_plus_one, gate) in zip(self.res_blocks, modulations):
            h = block.modulated_(h, shift, scale_plus_one, gate)
        return self.final_layer.modulated(h, *modulations[-1])

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor, cfg_scale: float
                         ) -> torch.Tensor:
        """Guided output for rows [cond; uncond] (2n rows): both halves are evaluated at the first half's
        x_t; the noise becomes uncond + cfg_scale * (cond - uncond) in both halves, each half keeps its own v."""
        half = x[: len(x) // 2]
        out = self(torch.cat([half, half]), t, z)
        eps = guided_noise(out, cfg_scale, self.in_channels)
        return torch.cat([torch.cat([eps, eps]), out[:, self.in_channels:]], dim=1)


def guided_noise(out: torch.Tensor, scale: float, channels: int) -> torch.Tensor:
    """Network output (2n, 2C) of [cond; uncond] rows -> the guided noise (n, C): uncond + scale (cond - uncond)."""
    cond, uncond = out[:, :channels].chunk(2)
    return uncond + scale * (cond - uncond)


class NoiseSource:
    """Where sampling draws its Gaussian noise.

    Without a generator, as the reference sampler: the start noise from the global CPU generator (then
    moved to the device), the per-step noise from the device's global generator, so a seeded run
    reproduces it. With a torch.Generator everything comes from that generator (on its own device).
    """

    def __init__(self, device: torch.device, generator: torch.Generator | None = None):
        self.device = device
        self.generator = generator

    def start(self, *shape: int) -> torch.Tensor:
        if self.generator is None:
            return torch.randn(*shape).to(self.device)
        return self.from_generator(shape)

    def step(self, *shape: int) -> torch.Tensor:
        if self.generator is None:
            return torch.randn(*shape, device=self.device)
        return self.from_generator(shape)

    def from_generator(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator, device=self.generator.device).to(self.device)


class DiffLoss(nn.Module):
    """Diffusion loss and sampler of tokens (N, target_channels) conditioned on vectors (N, z_channels)."""

    def __init__(self, target_channels: int, z_channels: int, depth: int, width: int,
                 num_sampling_steps: str | int = "100", grad_checkpointing: bool = False,
                 noise_schedule: str = "cosine"):
        super().__init__()
        self.in_channels = target_channels
        self.noise_schedule = noise_schedule
        self.net = SimpleMLPAdaLN(target_channels, width, 2 * target_channels, z_channels, depth,
                                  grad_checkpointing)
        self.train_diffusion = GaussianDiffusion.respaced("", schedule=noise_schedule)
        self.num_sampling_steps = str(num_sampling_steps)
        self._sampling_diffusions: dict[str, GaussianDiffusion] = {}
        self.gen_diffusion(self.num_sampling_steps)  # a bad spec fails when the model is built

    def gen_diffusion(self, num_sampling_steps: str | int | None = None) -> GaussianDiffusion:
        """The respaced diffusion of a sampling-step spec (default: the model's), built once per spec."""
        spec = self.num_sampling_steps if num_sampling_steps is None else str(num_sampling_steps)
        if spec not in self._sampling_diffusions:
            self._sampling_diffusions[spec] = GaussianDiffusion.respaced(spec, schedule=self.noise_schedule)
        return self._sampling_diffusions[spec]

    def forward(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss (noise MSE + variational bound) over the rows of target (N, C) where mask (N,) is 1
        (all rows without a mask), one random step and noise per row from the device's global generator."""
        t = torch.randint(0, NUM_STEPS, (target.shape[0],), device=target.device)
        noise = torch.randn_like(target)
        loss = self.train_diffusion.training_losses(lambda x_t, steps: self.net(x_t, steps, z), target, t,
                                                    noise)["loss"]
        if mask is not None:
            loss = (loss * mask).sum() / mask.sum()
        return loss.mean()

    @torch.no_grad()
    def sample(self, z: torch.Tensor, temperature: float = 1.0, cfg: float = 1.0,
               num_sampling_steps: str | int | None = None, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """Tokens drawn from p(x | z) by ancestral sampling over the respaced steps.

        z (N, D) -> (N, C); with cfg != 1, z holds [cond; uncond] rows (2n) and the result is the n guided
        tokens. Guided sampling draws one start noise for both halves and per-step noise for all 2n rows,
        as the reference sampler does, but tracks only the guided half's state (the other half is never
        used). The time and condition embeddings are computed once, and the adaLN modulations, which do not
        depend on x_t, for several steps per matrix product (see MODULATION_ROWS).
        """
        diffusion = self.gen_diffusion(num_sampling_steps)
        noise = NoiseSource(z.device, generator)
        rows, channels = z.shape[0], self.in_channels
        guided = cfg != 1.0
        n = rows // 2 if guided else rows
        steps = diffusion.original_step(torch.arange(diffusion.num_steps, device=z.device))
        t_emb = self.net.time_embed(steps)  # (K, W)
        z_emb = self.net.cond_embed(z)  # (rows, W)
        steps_per_product = max(1, MODULATION_ROWS // rows)
        modulations: dict[int, list[tuple[torch.Tensor, ...]]] = {}

        def modulation(k: int) -> list[tuple[torch.Tensor, ...]]:
            if k not in modulations:  # the loop runs k = K-1 down to 0: compute steps first..k in one go
                first = max(0, k - steps_per_product + 1)
                y = (z_emb + t_emb[first:k + 1, None]).flatten(0, 1)  # ((k + 1 - first) rows, W)
                parts = self.net.modulations(y)
                modulations.clear()
                for i in range(k + 1 - first):
                    modulations[first + i] = [tuple(part[i * rows:(i + 1) * rows] for part in block) for block in parts]
            return modulations[k]

        def model(x: torch.Tensor, k: int) -> torch.Tensor:
            if not guided:
                return self.net.denoise_modulated(x, modulation(k))
            out = self.net.denoise_modulated(torch.cat([x, x]), modulation(k))  # (2n, 2C)
            return torch.cat([guided_noise(out, cfg, channels), out[:n, channels:]], dim=1)

        x = noise.start(n, channels)
        return diffusion.p_sample_loop(model, x, lambda: noise.step(rows, channels)[:n], temperature)
