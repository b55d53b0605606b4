"""MAR's KL-VAE against the official code's outputs (tests/data/mar/, see the reference README).

The official tiny KL-VAE in kl16.ckpt's layout: embed_dim 8, ch 32, ch_mult [2, 1], one residual
block per encoder level, encoder attention at the second level; 32x32 images -> 8 x 16 x 16
latents. `vae_kl16.txt` lists the state dict of the released KL-16 VAE.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.testing import assert_close

from common.checkpoint import save_checkpoint
from common.config import validate
from common.errors import CheckpointError, ConfigError, DataError
from common.tokenizer import DiagonalGaussian
from mar.official import load_official_vae, official_vae_state, vae_arch_from_state
from mar.schema import VAE_ARCH
from mar.vae import KLVAE
from tests.helpers import DATA

MAR_DATA = os.path.join(DATA, "mar")
CKPT = os.path.join(MAR_DATA, "vae_tiny.ckpt")
REF = {k: torch.from_numpy(v) for k, v in np.load(os.path.join(MAR_DATA, "vae_ref.npz")).items()}
CACHE_FILES = {1: "cache_example/n01530575/img1.JPEG.npz", 2: "cache_example/n04254680/img2.JPEG.npz"}
TINY_ARCH = {"embed_dim": 8, "ch": 32, "ch_mult": [2, 1], "num_res_blocks": 1, "resolution": 32,
             "encoder_attn_resolutions": [16], "decoder_attn_resolutions": []}
KL16_PARAMS = 66_456_019
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiny() -> KLVAE:
    return load_official_vae(CKPT, resolution=32)[0]


@pytest.fixture(scope="module")
def moments(tiny) -> torch.Tensor:
    with torch.no_grad():
        return tiny.encode_moments(REF["x_in"])


def official_inputs() -> torch.Tensor:
    """The four PNGs as MAR preprocesses them: uint8 / 255, then normalised with mean 0.5, std 0.5."""
    pixels = np.stack([np.asarray(Image.open(os.path.join(MAR_DATA, "images", f"img{i}.png")).convert("RGB"))
                       for i in range(4)])
    assert np.array_equal(pixels, REF["images_uint8"].numpy())
    return (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5


def test_inputs_match_official_preprocessing():
    assert_close(official_inputs(), REF["x_in"])


def test_official_file_is_read_without_a_config(tiny):
    model, config = load_official_vae(CKPT)
    assert not model.training
    assert config.arch.resolution == 256 and config.arch.encoder_attn_resolutions == [128]
    assert model.token_shape == (8, 128, 128)
    assert (tiny.channels, tiny.scale_factor, tiny.downsample_factor, tiny.token_shape) == (8, 0.2325, 2, (8, 16, 16))
    assert sum(p.numel() for p in tiny.parameters()) == 400_459
    with torch.no_grad():  # the image size places attention by name only: the numbers are the same
        assert torch.equal(model.encode_moments(REF["x_in"][:1]), tiny.encode_moments(REF["x_in"][:1]))


def test_arch_is_read_off_the_weights():
    state = official_vae_state(torch.load(CKPT, weights_only=True))
    arch = vae_arch_from_state(state, CKPT, resolution=32)
    assert {k: arch[k] for k in TINY_ARCH} == TINY_ARCH and arch["z_channels"] == 8 and arch["double_z"]
    with torch.device("meta"):
        kl16_state = KLVAE().state_dict()
    kl16_arch = validate(vae_arch_from_state(kl16_state, "kl16"), VAE_ARCH, "kl16")
    assert kl16_arch == validate({"z_channels": 16}, VAE_ARCH, "defaults")


def test_moments_mean_and_clamped_logvar(tiny, moments):
    assert moments.shape == (4, 16, 16, 16)
    assert_close(moments, REF["moments"], **TOL)
    posterior = tiny.encode(REF["x_in"])
    assert_close(posterior.mean, REF["mean"], **TOL)
    assert_close(posterior.logvar, REF["logvar_clamped"], **TOL)
    assert_close(posterior.mode(), posterior.mean)


def test_reconstruction_from_mean(tiny):
    with torch.no_grad():
        recon, posterior = tiny(REF["x_in"], sample_posterior=False)
        assert_close(recon, REF["recon_from_mean"], **TOL)
        assert_close(tiny.decode(REF["mean"]), REF["recon_from_mean"], **TOL)


def test_reconstruction_through_the_latent_scale(tiny):
    assert_close(tiny.decode_tokens(REF["mean"] * 0.2325), REF["recon_via_scale"], **TOL)


def test_posterior_sample_draws_the_official_random_numbers(tiny, moments):
    torch.manual_seed(5)
    assert_close(DiagonalGaussian(moments).sample(), REF["sample_seed5"], **TOL)
    torch.manual_seed(5)
    assert_close(tiny.tokens_from_moments(moments), REF["sample_seed5"] * 0.2325, **TOL)
    torch.manual_seed(5)
    with torch.no_grad():
        recon, _ = tiny(REF["x_in"])
        assert_close(recon, tiny.decode(REF["sample_seed5"]), **TOL)


@pytest.mark.parametrize("index", sorted(CACHE_FILES))
def test_latent_cache_files_hold_encode_moments(tiny, moments, index):
    cached = np.load(os.path.join(MAR_DATA, CACHE_FILES[index]))
    assert_close(torch.from_numpy(cached["moments"]), moments[index], **TOL)
    with torch.no_grad():
        flipped = tiny.encode_moments(REF["x_in"][index:index + 1].flip(-1))[0]
    assert_close(torch.from_numpy(cached["moments_flip"]), flipped, **TOL)


def test_kl16_matches_the_released_state_dict():
    with torch.device("meta"):
        model = KLVAE.from_config({"type": "kl-vae"})
    assert sum(p.numel() for p in model.parameters()) == KL16_PARAMS
    listing = []
    with open(os.path.join(MAR_DATA, "vae_kl16.txt")) as f:
        for line in f:
            key, shape, dtype = line.split()
            listing.append((key, [int(n) for n in shape.strip("[]").split(",")], dtype))
    ours = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    assert ours == listing
    assert (model.token_shape, model.scale_factor) == ((16, 16, 16), 0.2325)


def test_trains_end_to_end(tiny):
    model = KLVAE.from_config({**TINY_ARCH, "checkpointing": True})
    model.load_state_dict(tiny.state_dict())
    recon, posterior = model(REF["x_in"][:1])
    ((recon - REF["x_in"][:1]).abs().mean() + 1e-6 * posterior.kl().mean()).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("images", [torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(3, 32, 32),
                                    torch.zeros(2, 1, 32, 32), torch.zeros(2, 3, 31, 32)])
def test_wrong_images_are_refused_in_one_line(tiny, images):
    with pytest.raises(DataError) as error:
        tiny.encode_moments(images)
    assert "images must be a float tensor (B, 3, H, W)" in str(error.value) and "\n" not in str(error.value)


def test_file_of_another_layout_is_refused_in_one_line(tmp_path):
    state = torch.load(CKPT, weights_only=True)["model"]
    other = tmp_path / "rqvae.pt"
    torch.save({"state_dict": state}, other)
    ours = tmp_path / "ours.pt"
    save_checkpoint(str(ours), {"model": state})
    for path in (other, ours):
        with pytest.raises(CheckpointError) as error:
            load_official_vae(str(path))
        assert "not an official MAR KL-VAE checkpoint" in str(error.value) and "\n" not in str(error.value)


def test_weights_that_do_not_fit_are_listed(tmp_path):
    state = torch.load(CKPT, weights_only=True)["model"]
    del state["decoder.up.1.block.1.conv2.bias"]
    path = tmp_path / "kl.ckpt"
    torch.save({"model": state}, path)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"dataset": {"type": "shapes"}, "arch": {"type": "kl-vae", **TINY_ARCH}}))
    with pytest.raises(CheckpointError, match="missing keys: decoder.up.1.block.1.conv2.bias"):
        load_official_vae(str(path), str(config))


def test_config_is_checked(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"dataset": {"type": "shapes"}, "arch": {"type": "kl-vae", **TINY_ARCH}}))
    model, cfg = load_official_vae(CKPT, str(config))
    assert (model.resolution, cfg.dataset.type) == (32, "shapes")
    config.write_text(yaml.safe_dump({"dataset": {"type": "shapes"}, "arch": {"type": "rq-vae"}}))
    with pytest.raises(ConfigError, match="arch.type must be kl-vae"):
        load_official_vae(CKPT, str(config))
    with pytest.raises(ConfigError, match="multiple of 32"):
        KLVAE.from_config({"ch": 48})
