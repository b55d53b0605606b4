"""scripts/reconstruct.py and compute_rfid.py on the official tiny RQ-VAE checkpoint."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import compute_rfid
from common.metrics import psnr, write_random_inception_weights
from scripts import reconstruct
from tests.helpers import DATA, assert_one_line_error, refused_in_process, run_cli

STAGE1 = os.path.join(DATA, "rqvae", "stage1")
VECTORS = torch.load(os.path.join(DATA, "rqvae", "stage1_vectors.pt"), weights_only=True)


def write_inputs(folder):
    os.makedirs(folder / "nested", exist_ok=True)
    names = ["a.png", "b.png", "nested/c.png", "nested/d.png"]
    for name, pixels in zip(names, VECTORS["input_u8_nhwc"].numpy()):
        Image.fromarray(pixels).save(folder / name)
    return names


def test_reconstruct_reproduces_official_reconstructions(tmp_path):
    names = write_inputs(tmp_path / "in")
    reconstruct.main(["--ckpt", os.path.join(STAGE1, "model.pt"), "--input", str(tmp_path / "in"), "--output",
                      str(tmp_path / "out"), "--device", "cpu"])
    for name, expected in zip(names, VECTORS["recon_png_u8_nhwc"].numpy()):
        ours = np.asarray(Image.open(tmp_path / "out" / name)).astype(int)
        # the official PNGs truncate to uint8, ours round: at most one level apart
        assert np.abs(ours - expected.astype(int)).max() <= 1
    grid = Image.open(tmp_path / "out" / "grid.png")
    assert grid.size[1] > grid.size[0] / 4  # two rows: inputs and reconstructions


def test_reconstruct_bad_input(tmp_path, capsys):
    ckpt = os.path.join(STAGE1, "model.pt")
    (tmp_path / "empty").mkdir()
    # the process itself, once: nothing but the line on stderr
    assert_one_line_error(run_cli("scripts/reconstruct.py", "--ckpt", ckpt, "--input", str(tmp_path / "empty"),
                                  "--output", str(tmp_path / "out")), "no images")
    write_inputs(tmp_path / "bad")
    (tmp_path / "bad" / "broken.png").write_bytes(b"not an image at all")
    line = refused_in_process(capsys, reconstruct.main, ["--ckpt", ckpt, "--input", str(tmp_path / "bad"),
                                                         "--output", str(tmp_path / "out")])
    assert "unreadable" in line and "broken.png" in line
    assert not (tmp_path / "out").exists()  # nothing half-written
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(ckpt, lonely / "model.pt")
    line = refused_in_process(capsys, reconstruct.main, ["--ckpt", str(lonely / "model.pt"), "--input",
                                                         str(tmp_path / "bad"), "--output", str(tmp_path / "out")])
    assert "config.yaml" in line


def test_compute_rfid_scores_official_checkpoint(tmp_path):
    data = tmp_path / "ffhq"
    write_inputs(data)
    weights = write_random_inception_weights(str(tmp_path / "inception.pth"))
    ckpt = tmp_path / "release" / "model.pt"
    shutil.copytree(STAGE1, ckpt.parent)
    results = compute_rfid.main(["--vqvae", str(ckpt), "--data-root", str(data), "--batch-size", "2",
                                 "--inception-weights", weights, "--no-lpips", "--device", "cpu",
                                 "--num-workers", "0"])
    assert results["num_images"] == 4 and results["rfid"] >= 0
    recon = torch.from_numpy(VECTORS["recon_png_u8_nhwc"].numpy()).permute(0, 3, 1, 2)
    original = VECTORS["input_u8_nhwc"].permute(0, 3, 1, 2)
    assert results["psnr"] == pytest.approx(psnr(original, recon).mean().item(), abs=0.2)
    assert 0 < results["usage_d0"] <= 1 and "perplexity_d2" in results
    assert json.load(open(ckpt.parent / "rfid.json"))["rfid"] == pytest.approx(results["rfid"])
    assert (ckpt.parent / "rfid.log").read_text().count("rfid:") == 1


def test_compute_rfid_bad_split(tmp_path):
    assert_one_line_error(run_cli("compute_rfid.py", "--vqvae", os.path.join(STAGE1, "model.pt"), "--split", "test"),
                          "--split must be val or train")
