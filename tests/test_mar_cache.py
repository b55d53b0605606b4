"""MAR's latent cache: main_cache.py writes the official layout, mar.cache.CachedLatents reads it back.

The two files under tests/data/mar/cache_example/ were written by the official caching code from
images/img1.png and img2.png, given the relative paths n01530575/img1.JPEG and n04254680/img2.JPEG,
with the tiny KL-VAE of vae_tiny.ckpt (32 px images -> moments of 16 x 16 x 16).
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import warnings

import numpy as np
import pytest
import torch
from torch.testing import assert_close
from torch.utils.data import DataLoader

import main_cache
from common.data import ShapesDataset
from common.errors import DataError
from mar.cache import CachedLatents, UnreadableImageSkipped, UnreadableLatentsWarning
from tests.helpers import DATA, assert_one_line_error, run_cli

MAR_DATA = os.path.join(DATA, "mar")
VAE = os.path.join(MAR_DATA, "vae_tiny.ckpt")
OFFICIAL = {"n01530575/img1.JPEG": "img1.png", "n04254680/img2.JPEG": "img2.png"}  # cache name -> input image
TINY = ["--img_size", "32", "--vae_path", VAE, "--vae_embed_dim", "8", "--device", "cpu", "--num_workers", "0"]
SHAPES = [*TINY, "--dataset", "shapes", "--batch_size", "2"]


def run_main(argv: list[str]) -> subprocess.CompletedProcess:
    """main_cache.main in this process, its exit status and output as a subprocess would report them."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main_cache.main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def image_folder(root, files: dict[str, str]) -> str:
    """`root/train/<cache name>` copies of the reference images (PIL reads them by content, not extension)."""
    for name, image in files.items():
        target = root / "train" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(MAR_DATA, "images", image), target)
    return str(root)


def cache_files(folder) -> dict[str, dict[str, np.ndarray]]:
    found = {}
    for directory, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(directory, name)
            with np.load(path) as data:
                found[os.path.relpath(path, folder)] = {k: data[k] for k in data.files}
    return found


@pytest.fixture(scope="module")
def shapes_cache(tmp_path_factory) -> str:
    """12 shapes: two files in each of the first two class folders, one in the other eight."""
    folder = str(tmp_path_factory.mktemp("cache") / "shapes")
    assert run_main([*SHAPES, "--num_images", "12", "--cached_path", folder]).returncode == 0
    return folder


def test_caching_reproduces_the_official_cache_files(tmp_path):
    data = image_folder(tmp_path / "data", OFFICIAL)
    result = run_main([*TINY, "--batch_size", "2", "--data_path", data, "--cached_path", str(tmp_path / "cache")])
    assert result.returncode == 0, result.stderr
    ours = cache_files(tmp_path / "cache")
    assert sorted(ours) == sorted(f"{name}.npz" for name in OFFICIAL)
    for name in ours:
        with np.load(os.path.join(MAR_DATA, "cache_example", name)) as official:
            assert sorted(ours[name]) == sorted(official.files) == ["moments", "moments_flip"]
            for key in official.files:
                assert ours[name][key].dtype == np.float32 and ours[name][key].shape == (16, 16, 16)
                assert_close(torch.from_numpy(ours[name][key]), torch.from_numpy(official[key]), rtol=1e-4, atol=1e-4)


def test_two_processes_write_the_files_of_one_and_a_rerun_skips_what_exists(tmp_path):
    args = [*SHAPES, "--num_images", "5"]  # an odd count: the processes get 3 and 2 images
    two = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main_cache.py", *args,
                  "--cached_path", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    assert "5 images cached" in two.stdout
    assert run_main([*args, "--cached_path", str(tmp_path / "one")]).returncode == 0  # one thread, as each worker
    one, two_files = cache_files(tmp_path / "one"), cache_files(tmp_path / "two")
    assert sorted(one) == sorted(two_files) == [f"{i:02d}_{name}/{i:06d}.npz"
                                                for i, name in enumerate(ShapesDataset.class_names[:5])]
    for name in one:
        for key in ("moments", "moments_flip"):
            assert np.array_equal(one[name][key], two_files[name][key])

    kept = tmp_path / "two" / "00_circle" / "000000.npz"
    mtime = kept.stat().st_mtime_ns
    removed = tmp_path / "two" / "03_star" / "000003.npz"
    removed.unlink()
    partial = tmp_path / "two" / "03_star" / "000003.npz.tmp4242"  # what a crash leaves behind
    partial.write_bytes(b"half a file")
    rerun = run_main([*args, "--cached_path", str(tmp_path / "two")])
    assert "1 images cached" in rerun.stdout and "(4 cached before" in rerun.stdout
    assert kept.stat().st_mtime_ns == mtime and not partial.exists()
    rewritten = cache_files(tmp_path / "two")["03_star/000003.npz"]["moments"]  # in a batch of its own
    assert_close(torch.from_numpy(rewritten), torch.from_numpy(one["03_star/000003.npz"]["moments"]),
                 rtol=1e-5, atol=1e-5)


def test_an_unreadable_image_is_skipped_and_counted(tmp_path):
    data = image_folder(tmp_path / "data", {"a/img1.png": "img1.png"})
    (tmp_path / "data" / "train" / "a" / "broken.JPEG").write_bytes(b"not an image")
    with pytest.warns(UnreadableImageSkipped, match="broken.JPEG"):
        result = run_main([*TINY, "--data_path", data, "--cached_path", str(tmp_path / "cache")])
    assert result.returncode == 0 and "1 images cached" in result.stdout and "1 unreadable skipped" in result.stdout
    assert sorted(cache_files(tmp_path / "cache")) == ["a/img1.png.npz"]


def test_labels_come_from_the_sorted_class_folders(shapes_cache):
    cache = CachedLatents(shapes_cache)
    assert cache.classes == [f"{i:02d}_{name}" for i, name in enumerate(ShapesDataset.class_names)]
    assert len(cache) == 12 and cache.num_classes == 10 and cache.moments_shape == (16, 16, 16)
    shapes = ShapesDataset("train", 32, 12)
    for index, (path, label) in enumerate(cache.samples):
        image = int(os.path.basename(path)[:-len(".npz")])
        assert label == cache[index]["label"] == shapes[image]["label"]
    assert cache.targets == [0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_the_flip_is_drawn_per_seed_epoch_and_index(shapes_cache):
    cache = CachedLatents(shapes_cache, seed=3)
    choices = {}
    for epoch in range(3):
        cache.set_epoch(epoch)
        choices[epoch] = [cache.uses_flip(i) for i in range(len(cache))]
        for index, (path, _) in enumerate(cache.samples):
            item = cache[index]
            with np.load(path) as data:
                stored = data["moments_flip" if choices[epoch][index] else "moments"]
            assert item["moments"].dtype == torch.float32 and item["skipped"] == 0
            assert torch.equal(item["moments"], torch.from_numpy(stored))
    assert any(choices[0]) and not all(choices[0]) and choices[0] != choices[1] != choices[2]

    again = CachedLatents(shapes_cache, seed=3)
    again.set_epoch(1)
    batches = DataLoader(again, batch_size=4, num_workers=2)  # the workers draw what one process draws
    moments = torch.cat([batch["moments"] for batch in batches])
    cache.set_epoch(1)
    assert torch.equal(moments, torch.stack([cache[i]["moments"] for i in range(len(cache))]))
    other = CachedLatents(shapes_cache, seed=4)
    assert [other.uses_flip(i) for i in range(len(other))] != choices[0]


def test_a_damaged_file_is_skipped_and_counted(shapes_cache, tmp_path):
    folder = tmp_path / "cache"
    shutil.copytree(shapes_cache, folder)
    truncated = folder / "01_square" / "000011.npz"
    truncated.write_bytes(truncated.read_bytes()[:100])
    np.savez(folder / "05_ring" / "000005.npz", moments=np.zeros((16, 8, 8), np.float32),
             moments_flip=np.zeros((16, 8, 8), np.float32))  # another shape than the rest of the cache
    cache = CachedLatents(str(folder))
    with pytest.warns(UnreadableLatentsWarning) as caught:
        items = [cache[i] for i in range(len(cache))] + [cache[3]]
    damaged = [str(w.message).split(":")[0] for w in caught if w.category is UnreadableLatentsWarning]
    assert sorted(damaged) == sorted([str(truncated), str(folder / "05_ring" / "000005.npz")])
    assert sum(item["skipped"] for item in items[:-1]) == 2 and items[-1]["skipped"] == 1
    assert items[3]["label"] == 2 and items[7]["label"] == 6  # the next file's moments and label in their place
    assert all(item["moments"].shape == (16, 16, 16) for item in items)


def test_a_cache_without_files_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_files" / "n01440764").mkdir(parents=True)
    for folder, message in [("missing", "no folder of cached latents"), ("empty", "no class folders"),
                            ("no_files", "a class folder without .npz files")]:
        with pytest.raises(DataError, match=message) as error:
            CachedLatents(str(tmp_path / folder))
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("case", ["no train folder", "no images", "foreign file", "discrete tokenizer", "embed dim",
                                  "no cache"])
def test_bad_input_is_one_line(tmp_path, case):
    data = image_folder(tmp_path / "data", {"a/img1.JPEG": "img1.png"})
    args = {flag: value for flag, value in zip(TINY[::2], TINY[1::2])}
    args.update({"--data_path": data, "--cached_path": str(tmp_path / "cache")})
    if case == "no train folder":
        args["--data_path"], expected = str(tmp_path), ("DataError", f"no folder {tmp_path / 'train'}")
    elif case == "no images":
        os.remove(os.path.join(data, "train", "a", "img1.JPEG"))
        expected = ("DataError", "no images")
    elif case == "foreign file":
        args["--vae_path"] = str(tmp_path / "other.pt")
        torch.save({"state_dict": torch.load(VAE, weights_only=True)["model"]}, args["--vae_path"])
        expected = ("CheckpointError", "other.pt")
    elif case == "discrete tokenizer":
        args["--vae_path"], expected = os.path.join(DATA, "npp", "vq_tiny.pt"), ("not a KL-VAE",)
    elif case == "embed dim":
        args["--vae_embed_dim"], expected = "16", ("--vae_embed_dim 16 does not match", "pass --vae_embed_dim 8")
    else:
        args["--cached_path"], expected = "", ("--cached_path is required",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing else may be printed
        result = run_main([part for flag, value in args.items() for part in (flag, value)])
    assert_one_line_error(result, *expected)
    assert not (tmp_path / "cache").exists()
