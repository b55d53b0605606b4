"""The LlamaGen VQ-16 tokenizer against the official code's outputs (tests/data/npp/, see the reference README).

The official tiny VQ: 128 codes of dimension 6, ch 32, ch_mult [2, 1], one residual block per encoder
level; 24x24 images -> 12x12 codes. `llamagen_vq16.txt` lists the state dict of the released VQ-16.
"""
from __future__ import annotations

import copy
import os
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.testing import assert_close

import compute_rfid
from common.config import read_yaml
from common.errors import CheckpointError, ConfigError, DataError
from common.metrics import write_random_inception_weights
from methods import load_tokenizer
from npp.official import vq_arch_from_state
from npp.vq import VQTokenizer
from scripts import reconstruct
from tests.helpers import DATA, ROOT, refused_in_process

NPP_DATA = os.path.join(DATA, "npp")
CKPT = os.path.join(NPP_DATA, "vq_tiny.pt")
OUTPUTS = dict(np.load(os.path.join(NPP_DATA, "vq_tiny_outputs.npz")))
VQ16_CONFIG = os.path.join(ROOT, "configs", "imagenet", "stage1", "llamagen-vq16.yaml")


def official_inputs() -> torch.Tensor:
    """The four 24x24 input PNGs as the official preprocessing makes them: (4, 3, 24, 24) in [-1, 1]."""
    pixels = np.stack([np.asarray(Image.open(os.path.join(NPP_DATA, f"vq_input_{i}.png")).convert("RGB"))
                       for i in range(4)])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def official_recon_pngs() -> np.ndarray:
    return np.stack([np.asarray(Image.open(os.path.join(NPP_DATA, f"vq_recon_{i}.png"))) for i in range(4)])


def write_tiny_setup(tmp_path, dataset: dict) -> tuple[str, str]:
    """The four input PNGs in a folder, and a config rebuilding the tiny file at 24 px: (folder, config)."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.open(os.path.join(NPP_DATA, f"vq_input_{i}.png")).save(images / f"{i}.png")
    arch = {**vq_arch_from_state(torch.load(CKPT, weights_only=True)["model"], CKPT), "image_size": 24}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"dataset": dataset, "arch": arch}))
    return str(images), str(config)


@pytest.fixture(scope="module")
def tiny():
    return load_tokenizer(CKPT)[0]


def test_released_file_is_rebuilt_from_its_weight_shapes(tiny):
    _, config = load_tokenizer(CKPT)
    arch = config["arch"]
    assert (arch["codebook_size"], arch["codebook_embed_dim"], arch["ch"], arch["num_res_blocks"]) == (128, 6, 32, 1)
    assert arch["encoder_ch_mult"] == arch["decoder_ch_mult"] == [2, 1] and arch["z_channels"] == 24
    assert config["dataset"]["type"] == "imagenet" and not tiny.training
    assert tiny.vocab_size == 128 and tiny.downsample_factor == 2 and tiny.code_shape == (128, 128)


@torch.no_grad()
def test_official_encode_quantize_and_decode(tiny):
    x = official_inputs()
    z = tiny.encode(x)
    assert_close(z, torch.from_numpy(OUTPUTS["z_e"]), rtol=0, atol=1e-5)
    quantized, losses, codes = tiny.quantize(z)
    assert torch.equal(codes, torch.from_numpy(OUTPUTS["codes"]))
    assert torch.equal(tiny.encode_tokens(x), codes)
    assert_close(quantized, torch.from_numpy(OUTPUTS["quant"]), rtol=0, atol=1e-6)
    assert float(losses.vq) == float(losses.commit) == 0.0  # eval mode
    recon = tiny.decode_tokens(codes)
    assert_close(recon, torch.from_numpy(OUTPUTS["recon"]), rtol=0, atol=1e-5)
    # the official post-processing (truncation of 127.5 x + 128) gives the released PNGs exactly
    official_uint8 = (127.5 * recon + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(official_uint8, official_recon_pngs())


def test_official_training_losses_and_usage_window(tiny):
    quantizer = copy.deepcopy(tiny.quantize).train()
    quantizer.commit_beta, quantizer.entropy_ratio = 0.3, 0.05  # the reference's settings
    z = torch.from_numpy(OUTPUTS["z_e"]).requires_grad_(True)
    quantized, losses, _ = quantizer(z)
    assert_close(losses.vq, torch.tensor(OUTPUTS["vq_loss"]), rtol=1e-5, atol=0)
    assert_close(losses.commit, torch.tensor(OUTPUTS["commit_loss"]), rtol=1e-5, atol=0)
    assert_close(losses.entropy, torch.tensor(OUTPUTS["entropy_loss"]), rtol=1e-4, atol=0)
    assert losses.usage == pytest.approx(float(OUTPUTS["codebook_usage"]))  # 71 codes + the window's initial zeros
    assert torch.equal(quantizer.codebook_used[-576:].long(), torch.from_numpy(OUTPUTS["codes"]).flatten())
    (losses.commit + quantized.sum()).backward()  # straight-through: the latent receives gradients
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_vq16_config_builds_the_released_state_dict_layout():
    with torch.device("meta"):
        model = VQTokenizer.from_config(read_yaml(VQ16_CONFIG)["arch"], VQ16_CONFIG)
    listing = [f"{k} [{','.join(map(str, v.shape))}] {str(v.dtype).removeprefix('torch.')}"
               for k, v in model.state_dict().items()]
    with open(os.path.join(NPP_DATA, "llamagen_vq16.txt")) as f:
        assert sorted(listing) == sorted(f.read().splitlines())
    assert sum(p.numel() for p in model.parameters()) == 71_883_403
    assert model.code_shape == (16, 16)
    inferred = vq_arch_from_state(model.state_dict(), "meta")
    assert {k: inferred[k] for k in ("encoder_ch_mult", "decoder_ch_mult", "ch", "num_res_blocks", "z_channels",
                                     "codebook_size", "codebook_embed_dim")} == \
        {"encoder_ch_mult": [1, 1, 2, 2, 4], "decoder_ch_mult": [1, 1, 2, 2, 4], "ch": 128, "num_res_blocks": 2,
         "z_channels": 256, "codebook_size": 16384, "codebook_embed_dim": 8}


def test_bare_state_dicts_and_ema_weights_load(tmp_path, tiny):
    state = torch.load(CKPT, weights_only=True)["model"]
    torch.save(state, tmp_path / "bare.pt")
    bare, _ = load_tokenizer(str(tmp_path / "bare.pt"))
    assert all(torch.equal(a, b) for a, b in zip(bare.state_dict().values(), tiny.state_dict().values()))
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save({"model": state, "ema": ema}, tmp_path / "with_ema.pt")
    with_ema, _ = load_tokenizer(str(tmp_path / "with_ema.pt"))
    raw, _ = load_tokenizer(str(tmp_path / "with_ema.pt"), use_ema=False)
    assert torch.equal(with_ema.decoder.conv_out.bias, state["decoder.conv_out.bias"] + 1)
    assert torch.equal(raw.decoder.conv_out.bias, state["decoder.conv_out.bias"])


def test_config_sets_the_image_size_and_mismatches_are_listed(tmp_path):
    arch = {"type": "vq16", "codebook_size": 128, "codebook_embed_dim": 6, "encoder_ch_mult": [2, 1],
            "decoder_ch_mult": [2, 1], "z_channels": 24, "ch": 32, "num_res_blocks": 1, "image_size": 24}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"dataset": {"type": "folder"}, "arch": arch}))
    model, _ = load_tokenizer(CKPT, str(config))
    assert model.image_size == 24 and model.code_shape == (12, 12)
    config.write_text(yaml.safe_dump({"dataset": {"type": "folder"}, "arch": {**arch, "codebook_size": 256}}))
    with pytest.raises(CheckpointError, match=r"quantize.embedding.weight \(128, 6\) vs \(256, 6\)"):
        load_tokenizer(CKPT, str(config))
    config.write_text(yaml.safe_dump({"dataset": {"type": "folder"}, "arch": {**arch, "type": "rq-vae"}}))
    with pytest.raises(ConfigError, match="arch.type must be vq16"):
        load_tokenizer(CKPT, str(config))
    config.write_text(yaml.safe_dump({"dataset": {"type": "folder"}, "arch": {**arch, "ch": 20}}))
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_tokenizer(CKPT, str(config))


def test_incomplete_file_is_refused_with_the_missing_key(tmp_path):
    state = torch.load(CKPT, weights_only=True)["model"]
    del state["encoder.conv_out.weight"]
    torch.save({"model": state}, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="encoder.conv_out.weight"):
        load_tokenizer(str(tmp_path / "broken.pt"))


@torch.no_grad()
def test_bad_codes_and_images_are_refused(tiny):
    with pytest.raises(DataError, match=r"values in \[0, 128\)"):
        tiny.decode_tokens(torch.full((1, 12, 12), 128))
    with pytest.raises(DataError, match="multiples of 2"):
        tiny.encode(torch.zeros(1, 3, 23, 24))


def test_reconstruct_script_with_the_official_file(tmp_path, capsys):
    source, config = write_tiny_setup(tmp_path, {"type": "folder"})
    reconstruct.main(["--ckpt", CKPT, "--config", config, "--input", source, "--output", str(tmp_path / "out"),
                      "--device", "cpu"])
    ours = np.stack([np.asarray(Image.open(tmp_path / "out" / f"{i}.png")) for i in range(4)]).astype(int)
    # ours round, the official PNGs truncate: at most one level apart
    assert np.abs(ours - official_recon_pngs().astype(int)).max() <= 1
    assert (tmp_path / "out" / "grid.png").is_file()
    capsys.readouterr()  # the progress bar of the run above
    assert "nope.yaml" in refused_in_process(capsys, reconstruct.main, [
        "--ckpt", CKPT, "--config", str(tmp_path / "nope.yaml"), "--input", source, "--output", str(tmp_path / "out2")])


def test_compute_rfid_scores_the_official_file(tmp_path):
    images, config = write_tiny_setup(tmp_path, {"type": "folder", "resolution": 24})
    release = tmp_path / "release"
    release.mkdir()
    shutil.copy(CKPT, release / "vq_tiny.pt")  # rfid.json is written beside the checkpoint
    weights = write_random_inception_weights(str(tmp_path / "inception.pth"))
    results = compute_rfid.main(["--vqvae", str(release / "vq_tiny.pt"), "--config", config,
                                 "--data-root", images, "--split", "train", "--batch-size", "2",
                                 "--inception-weights", weights, "--no-lpips", "--device", "cpu",
                                 "--num-workers", "0"])
    assert results["num_images"] == 4 and results["rfid"] >= 0
    assert results["usage_d0"] == len(np.unique(OUTPUTS["codes"])) / 128  # the official codes: 71 of 128
    assert (release / "rfid.json").is_file()
