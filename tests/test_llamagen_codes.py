"""LlamaGen's code files: the official ten-crop / flip extraction reproduced, read back one view per item."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

import main_stage2
from common.errors import DataError
from common.llamagen_codes import LlamaGenCodes, open_codes, output_folders, write_image_codes
from common.token_cache import CachedTokens
from methods import load_tokenizer
from scripts import extract_codes
from tests.helpers import DATA, refused_in_process

VQ = os.path.join(DATA, "npp", "vq_tiny.pt")  # 24 px -> 12x12 codes of 128 entries
OFFICIAL = os.path.join(DATA, "npp", "extract")
EXTRACT = ["--tokenizer", VQ, "--image-size", "24", "--num-workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def source_folder(tmp_path_factory) -> str:
    """ImageNet layout whose only image is the official source, in the ninth class folder (label 8)."""
    root = tmp_path_factory.mktemp("images")
    for label in range(9):
        (root / "train" / f"n{label:02d}").mkdir(parents=True)
    shutil.copy(os.path.join(OFFICIAL, "extract_source.png"), root / "train" / "n08" / "source.png")
    return str(root)


def random_folder(directory, views: int, count: int = 6, offset: int = 0):
    rng = np.random.default_rng(views)
    folders = output_folders(str(directory), "imagenet24")
    write_image_codes(folders, np.arange(count), rng.integers(0, 64, (count, views, 12, 12)) + offset,
                      np.arange(count) % 10)
    return folders


def test_official_ten_crop_and_flip_files_are_reproduced(source_folder, tmp_path):
    extract_codes.main([*EXTRACT, "--data-root", source_folder, "--layout", "llamagen", "--ten-crop",
                        "--crop-range", "1.2", "--output", str(tmp_path / "ten")])
    extract_codes.main([*EXTRACT, "--data-root", source_folder, "--layout", "llamagen",
                        "--output", str(tmp_path / "flip")])
    labels = np.load(os.path.join(OFFICIAL, "labels_0.npy"))
    for name, folder in (("ten_crop", "ten"), ("flip", "flip")):
        ours = np.load(tmp_path / folder / "imagenet24_codes" / "0.npy")
        official = np.load(os.path.join(OFFICIAL, f"codes_{name}_0.npy"))
        assert ours.dtype == np.int64 and np.array_equal(ours, official)
        label = np.load(tmp_path / folder / "imagenet24_labels" / "0.npy")
        assert label.dtype == labels.dtype and np.array_equal(label, labels)

    # a rerun completes an interrupted extraction; the ten views also go into our shards
    official = np.load(os.path.join(OFFICIAL, "codes_ten_crop_0.npy"))
    os.remove(tmp_path / "ten" / "imagenet24_codes" / "0.npy")
    extract_codes.main([*EXTRACT, "--data-root", source_folder, "--layout", "llamagen", "--ten-crop",
                        "--crop-range", "1.2", "--output", str(tmp_path / "ten")])
    assert np.array_equal(np.load(tmp_path / "ten" / "imagenet24_codes" / "0.npy"), official)
    extract_codes.main([*EXTRACT, "--data-root", source_folder, "--ten-crop", "--crop-range", "1.2",
                        "--output", str(tmp_path / "shards")])
    shards = CachedTokens(str(tmp_path / "shards"))
    assert shards.tokens.shape == (1, 10, 12, 12) and np.array_equal(shards.tokens.reshape(1, 10, 144), official)
    assert len(shards.meta["augmentations"]) == 10


def test_each_item_trains_on_one_view_drawn_per_epoch(tmp_path):
    folders = random_folder(tmp_path / "x_ten_crop", views=10)
    stored = [np.load(os.path.join(folders.codes, f"{i}.npy"))[0].reshape(10, 12, 12) for i in range(6)]
    # the official extraction's folder, or its codes folder itself
    for directory in (tmp_path / "x_ten_crop", folders.codes):
        codes = LlamaGenCodes(str(directory), seed=3)
        assert len(codes) == 6 and codes.shape == (1, 10, 144)
        chosen = set()
        for epoch in range(8):
            codes.set_epoch(epoch)
            for i in range(6):
                item = codes[i]
                assert item["codes"].dtype == torch.int64 and item["codes"].shape == (12, 12)
                assert item["label"] == i % 10
                view = [k for k in range(10) if np.array_equal(stored[i][k], item["codes"].numpy())]
                assert len(view) == 1
                chosen.add(view[0])
        assert len(chosen) >= 8  # views vary over items and epochs
    again = LlamaGenCodes(str(tmp_path / "x_ten_crop"), seed=3)
    again.set_epoch(7)
    assert torch.equal(again[5]["codes"], codes[5]["codes"])  # drawn from (seed, epoch, item): reproducible

    # as LlamaGen's loader: a second extraction in the `ten_crop_105` sibling doubles the views
    random_folder(tmp_path / "x_ten_crop_105", views=10, offset=64)
    doubled = LlamaGenCodes(str(tmp_path / "x_ten_crop"))
    assert len(doubled.sources) == 2
    picks = []
    for epoch in range(20):
        doubled.set_epoch(epoch)
        picks += [bool(doubled[i]["codes"].min() >= 64) for i in range(6)]
    assert 0.3 < np.mean(picks) < 0.7


def test_bad_code_folders_give_one_clear_line(tmp_path, source_folder, capsys):
    vq, _ = load_tokenizer(VQ)
    folders = random_folder(tmp_path / "mixed", views=2)
    np.save(os.path.join(folders.codes, "4.npy"), np.zeros((1, 10, 144), dtype=np.int64))
    with pytest.raises(DataError, match=r"4.npy: codes of shape \[1, 10, 144\], but .*0.npy has \[1, 2, 144\]"):
        LlamaGenCodes(str(tmp_path / "mixed"))

    folders = random_folder(tmp_path / "unlabelled", views=2)
    os.remove(os.path.join(folders.labels, "3.npy"))
    line = refused_in_process(capsys, main_stage2.main, ["-m", "configs/shapes/stage2/npp-gpt.yaml", "-r",
                                                         str(tmp_path / "run"), "-v", VQ, "dataset.resolution=24",
                                                         f"codes.train={tmp_path / 'unlabelled'}"])
    assert "3.npy" in line and "no labels file" in line

    # codes of a larger codebook than the tokenizer's (and so the prior's) 128 entries, as main_stage2 opens them
    random_folder(tmp_path / "foreign", views=2, offset=100)
    with pytest.raises(DataError, match=r"imagenet24_codes/0.npy: code \d+ is outside the tokenizer's 128-entry"):
        open_codes(str(tmp_path / "foreign"), 0, vq, 24)
    with pytest.raises(DataError, match="12x12 codes per image, the tokenizer makes 16x16"):
        open_codes(str(tmp_path / "foreign"), 0, vq, 32)  # another extraction size than the config's

    with pytest.raises(SystemExit):
        extract_codes.main([*EXTRACT, "--data-root", source_folder, "--ten-crop", "--flip", "--output",
                            str(tmp_path / "x")])
    assert "drop --flip" in capsys.readouterr().err
