"""Losses shared by the tokenizers (RQ-VAE, Open-MAGVIT2): LPIPS, PatchGAN, GAN losses, LeCAM.

The perceptual loss is the `lpips` package's VGG16 LPIPS with its shipped v0.1 linear heads
and a torchvision VGG16 trunk read from a local file. The discriminator is pix2pix's
PatchGAN with the official key names (`main.{i}`). The GAN losses are small functions,
picked by the names the official configs use (`DISC_LOSSES`, `GEN_LOSSES`).
"""
from __future__ import annotations

import bisect
import warnings

import lpips
import torch
import torch.nn.functional as F
from torch import nn

from common.checkpoint import load_file
from common.errors import CheckpointError, ConfigError, WeightsError
from common.weights import find_weights

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
# torchvision `features` index one past the end of each LPIPS slice (relu1_2, ..., relu5_3)
LPIPS_SLICE_ENDS = (4, 9, 16, 23, 30)


#################################################################################
#                                 Perceptual loss                               #
#################################################################################

def vgg16_features_to_lpips(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename torchvision VGG16 `features.{i}.*` entries to lpips' trunk keys `slice{k}.{i}.*`."""
    renamed = {}
    for key, tensor in state_dict.items():
        prefix, _, rest = key.partition(".")
        index, _, param = rest.partition(".")
        if prefix != "features" or not index.isdigit() or int(index) >= LPIPS_SLICE_ENDS[-1]:
            continue
        slice_number = bisect.bisect_right(LPIPS_SLICE_ENDS, int(index)) + 1
        renamed[f"slice{slice_number}.{index}.{param}"] = tensor
    return renamed


class LPIPS(nn.Module):
    """LPIPS-VGG distance of [-1, 1] images, frozen and always in eval mode.

    The trunk is torchvision's ImageNet VGG16 from a local `vgg16-397923af.pth` (explicit
    `vgg_weights` path or the torch hub cache); `random_trunk=True` keeps a random trunk (tests only).
    """

    def __init__(self, vgg_weights: str | None = None, random_trunk: bool = False):
        super().__init__()
        path = None if random_trunk else find_weights(VGG16_FILENAME, vgg_weights, VGG16_URL, "--vgg-weights")
        with warnings.catch_warnings():  # lpips builds the trunk through torchvision's deprecated `pretrained=`
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            self.lpips = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
        if path is None:
            warnings.warn("LPIPS uses a RANDOM VGG16 trunk (random_trunk=True): perceptual losses "
                          "are meaningless, use this only in tests", stacklevel=2)
        else:
            self.load_trunk(path)
        self.requires_grad_(False)
        self.eval()

    def load_trunk(self, path: str) -> None:
        """Load torchvision VGG16 weights from `path` into the LPIPS trunk."""
        try:
            state_dict = load_file(path)
        except CheckpointError as error:
            raise WeightsError(str(error)) from None
        if not isinstance(state_dict, dict):
            raise WeightsError(f"{path}: not a torchvision VGG16 state dict; expected {VGG16_FILENAME} "
                               f"from {VGG16_URL}")
        trunk = vgg16_features_to_lpips(state_dict)
        expected = self.lpips.net.state_dict()
        wrong = [k for k in expected if k not in trunk or trunk[k].shape != expected[k].shape]
        if wrong:
            raise WeightsError(f"{path}: not a torchvision VGG16 state dict (missing or mis-shaped "
                               f"{', '.join(wrong[:4])}); expected {VGG16_FILENAME} from {VGG16_URL}")
        self.lpips.net.load_state_dict(trunk)

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # frozen metric: dropout before the linear heads stays off

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lpips(x, y).flatten()  # (B, 1, 1, 1) -> (B,)


#################################################################################
#                             PatchGAN discriminator                            #
#################################################################################

class ActNorm(nn.Module):
    """Per-channel affine layer initialised from the first training batch to zero mean, unit std (Glow)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        per_channel = x.transpose(0, 1).flatten(1)  # (C, B*H*W)
        self.loc.copy_(-per_channel.mean(1).view_as(self.loc))
        self.scale.copy_(1 / (per_channel.std(1).view_as(self.scale) + 1e-6))
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.initialized.item() == 0:
            self.initialize(x)
        return self.scale * (x + self.loc)


class NLayerDiscriminator(nn.Module):
    """pix2pix PatchGAN: stride-2 convs doubling the width (at most 8*ndf), one stride-1 conv, a 1-channel logit map.

    Keys `main.{i}` as in the official checkpoints (RQ-VAE: n_layers 2; Open-MAGVIT2: n_layers 3).
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False):
        super().__init__()
        if n_layers < 1:
            raise ConfigError(f"discriminator n_layers must be at least 1, got {n_layers}")
        norm = ActNorm if use_actnorm else nn.BatchNorm2d
        hidden_bias = use_actnorm  # BatchNorm's shift makes a conv bias redundant
        widths = [ndf * min(2 ** n, 8) for n in range(n_layers + 1)]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for n in range(1, n_layers + 1):
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(widths[n - 1], widths[n], 4, stride=stride, padding=1, bias=hidden_bias),
                       norm(widths[n]), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        init_discriminator_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, H', W') patch logits


def init_discriminator_weights(module: nn.Module) -> None:
    """pix2pix init: conv weights N(0, 0.02) (biases keep PyTorch's default), BatchNorm weight N(1, 0.02), bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


#################################################################################
#                                   GAN losses                                  #
#################################################################################

def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake))) over every patch logit."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the patch logits, in softplus form, halved like the hinge loss."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def _image_means(logits: torch.Tensor) -> torch.Tensor:
    return logits.flatten(1).mean(1)  # (B, 1, H', W') -> (B,)


def image_mean_non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Open-MAGVIT2's "non_saturate" D loss: cross-entropy of each image's MEAN logit (not halved)."""
    real, fake = _image_means(logits_real), _image_means(logits_fake)
    return (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
            + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-mean D(fake): the generator loss RQ-VAE configs call "vanilla"."""
    return -logits_fake.mean()


def image_mean_non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Open-MAGVIT2's generator loss: mean over images of softplus(-l), l = the image's MEAN patch logit.

    The spatial averaging comes BEFORE the softplus (not a per-patch non-saturating loss).
    """
    image_logits = _image_means(logits_fake)
    return F.binary_cross_entropy_with_logits(image_logits, torch.ones_like(image_logits))


DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss, "non_saturate": image_mean_non_saturating_d_loss}
GEN_LOSSES = {"vanilla": hinge_g_loss, "hinge": hinge_g_loss, "non_saturating": image_mean_non_saturating_g_loss}


def adaptive_generator_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                              max_weight: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """VQGAN's balance: ||d nll / dW|| / (||d g / dW|| + eps), clamped to [0, max_weight], detached.

    W is the decoder's last weight; the graph is kept for the backward pass that follows.
    """
    nll_grad, = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    return (nll_grad.norm() / (g_grad.norm() + eps)).clamp(0.0, max_weight).detach()


class LeCAMRegularizer:
    """LeCAM regulariser: penalise real logits above the fake-logit EMA and fake logits below the real-logit EMA.

    The EMAs are plain floats (means of all logits of a batch), as in Open-MAGVIT2; unlike there
    they are saved in our checkpoints (`state_dict`) so a resumed run continues exactly.
    """

    def __init__(self, decay: float = 0.999):
        self.decay = decay
        self.ema_real = 0.0
        self.ema_fake = 0.0

    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        self.ema_real = self.ema_real * self.decay + logits_real.detach().mean().item() * (1 - self.decay)
        self.ema_fake = self.ema_fake * self.decay + logits_fake.detach().mean().item() * (1 - self.decay)

    def loss(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        return (F.relu(logits_real - self.ema_fake).pow(2).mean()
                + F.relu(self.ema_real - logits_fake).pow(2).mean())

    def state_dict(self) -> dict[str, float]:
        return {"ema_real": self.ema_real, "ema_fake": self.ema_fake}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.ema_real = float(state["ema_real"])
        self.ema_fake = float(state["ema_fake"])
