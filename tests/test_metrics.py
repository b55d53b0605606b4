"""Evaluation: compute_metrics.py against stock torch-fidelity, statistics files, reconstruction metrics.

The Inception weights are random, written by the tests in torch-fidelity's file layout: the scores
mean nothing, but both pipelines must agree on them exactly.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import torch_fidelity
from PIL import Image
from torch import nn

import compute_metrics
from common import dist
from common.errors import DataError, WeightsError
from common.metrics import (INCEPTION_FILE, INCEPTION_URL, FIDStatistics, InceptionAccumulator, ReconstructionMeter,
                            code_counts, codebook_usage, extract_features, find_inception_weights,
                            load_inception, load_statistics, psnr, ssim, usage_from_counts,
                            write_random_inception_weights)
from common.metrics.images import FolderImages, open_npz_array
from tests.helpers import refused_in_process

DATA = os.path.join(os.path.dirname(__file__), "data", "metrics")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smooth_images(count: int, seed: int, size: int = 32, shift: int = 0) -> np.ndarray:
    """(count, size, size, 3) uint8: bicubic-upsampled 4x4 colour noise."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = (rng.integers(0, 200, size=(4, 4, 3)) + shift).astype(np.uint8)
        images.append(np.array(Image.fromarray(coarse).resize((size, size), Image.BICUBIC)))
    return np.stack(images)


def write_folder(folder, images: np.ndarray) -> str:
    os.makedirs(folder, exist_ok=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(folder, f"{index:05d}.png"))
    return str(folder)


class PixelFeatures(nn.Module):
    """A fast stand-in for Inception with its output layout: 4x4-pooled pixels as 48-d "pool features" and
    "logits". The command-line plumbing is tested with it; the real network only where torch-fidelity is the
    reference (a 2048-d Fréchet distance alone takes seconds)."""

    dim = 48

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, images):
        pooled = F.adaptive_avg_pool2d(images.float(), 4).flatten(1)  # (B, 48)
        return pooled, pooled / 32


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_random_inception_weights(str(tmp_path_factory.mktemp("weights") / INCEPTION_FILE), seed=0)


@pytest.fixture
def pixel_weights(tmp_path, monkeypatch):
    """compute_metrics with PixelFeatures in place of Inception; returns a (never read) weights path."""
    monkeypatch.setattr(compute_metrics, "load_inception", lambda path, device: PixelFeatures())
    monkeypatch.setattr(compute_metrics, "POOL_DIM", PixelFeatures.dim)
    path = tmp_path / INCEPTION_FILE
    path.write_bytes(b"")
    return str(path)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    fake = smooth_images(10, seed=1)
    np.savez(root / "fake.npz", arr_0=fake)
    return {"fake": write_folder(root / "fake", fake), "fake_npz": str(root / "fake.npz"),
            "ref": write_folder(root / "ref", smooth_images(10, seed=2, shift=30)),
            "few_ref": write_folder(root / "few_ref", smooth_images(4, seed=2, shift=30)), "root": root}


def run(weights, *argv):
    """compute_metrics.main on CPU, single-process loading."""
    return compute_metrics.main([*argv, "--inception-weights", weights, "--device", "cpu", "--num-workers", "0"])


def refused(capsys, argv) -> str:
    return refused_in_process(capsys, compute_metrics.main, argv)


# ---------------------------------------------------------------------------------------------
# compute_metrics.py against torch-fidelity
# ---------------------------------------------------------------------------------------------

def test_scores_match_a_direct_torch_fidelity_call(weights, sets):
    # 10 images for the Inception Score's 10 splits, 4 references (more than precision/recall's 3 neighbours): each
    # image costs both pipelines a pass of the real Inception network
    ours = run(weights, "--fake", sets["fake"], "--ref", sets["few_ref"], "--metrics", "fid,isc,prc")
    theirs = torch_fidelity.calculate_metrics(
        input1=sets["fake"], input2=sets["few_ref"], fid=True, isc=True, prc=True, cuda=False, verbose=False,
        cache=False, feature_extractor="inception-v3-compat", feature_layer_prc="2048",
        feature_extractor_weights_path=weights, save_cpu_ram=True)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)
    assert ours["fid"] > 0.1  # the two sets differ, so the comparison is not between two zeros
    assert ours["is_mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-5)
    assert ours["is_std"] == pytest.approx(theirs["inception_score_std"], rel=1e-5)
    assert (ours["precision"], ours["recall"]) == (theirs["precision"], theirs["recall"])
    with open(os.path.join(sets["fake"], "metrics.json")) as handle:
        written = json.load(handle)
    assert {"fid", "is_mean", "is_std", "precision", "recall", "num_images", "reference", "backend"} <= set(written)
    assert written["num_images"] == 10 and written["fid"] == ours["fid"]


def test_fid_from_saved_statistics_equals_fid_from_the_folder(pixel_weights, sets, tmp_path):
    stats_path = str(tmp_path / "ref_stats.npz")
    assert run(pixel_weights, "--fake", sets["ref"], "--save-stats", stats_path) is not None
    saved = load_statistics(stats_path)
    assert saved.mu.shape == (48,) and saved.sigma.shape == (48, 48) and saved.num_images == 10
    from_folder = run(pixel_weights, "--fake", sets["fake"], "--ref", sets["ref"], "--metrics", "fid")["fid"]
    from_stats = run(pixel_weights, "--fake", sets["fake"], "--ref", stats_path, "--metrics", "fid")["fid"]
    assert from_folder > 1
    assert from_stats == pytest.approx(from_folder, rel=1e-9)
    np.savez(tmp_path / "f32.npz", mu=saved.mu.astype(np.float32), sigma=saved.sigma.astype(np.float32))
    from_f32 = run(pixel_weights, "--fake", sets["fake"], "--ref", str(tmp_path / "f32.npz"), "--metrics", "fid")
    assert from_f32["fid"] == pytest.approx(from_folder, rel=1e-5)


def test_fid_of_a_folder_against_itself_is_zero(pixel_weights, sets, tmp_path):
    stats_path = str(tmp_path / "stats.npz")
    result = run(pixel_weights, "--fake", sets["fake"], "--ref", sets["fake"], "--metrics", "fid",
                 "--save-stats", stats_path)
    scale = np.trace(load_statistics(stats_path).sigma)  # FID is a sum of variances: compare at their scale
    assert abs(result["fid"]) < 1e-6 * scale


def test_npz_and_folder_inputs_give_the_same_scores(pixel_weights, sets):
    folder = run(pixel_weights, "--fake", sets["fake"], "--ref", sets["ref"])
    npz = run(pixel_weights, "--fake", sets["fake_npz"], "--ref", sets["ref"])
    assert npz["fid"] == pytest.approx(folder["fid"], rel=1e-9)
    assert npz["is_mean"] == pytest.approx(folder["is_mean"], rel=1e-9)
    assert os.path.isfile(sets["fake_npz"][:-4] + ".metrics.json")


def test_official_form_resolves_ref_dataset_to_a_statistics_file(pixel_weights, sets, tmp_path, capsys):
    stats_dir = tmp_path / "fid_stats"
    run(pixel_weights, "--fake", sets["ref"], "--save-stats", str(stats_dir / "ffhq_256_train.npz"))
    result = run(pixel_weights, f"fake_path={sets['fake']}", "ref_dataset=ffhq", "--stats-dir", str(stats_dir))
    direct = run(pixel_weights, "--fake", sets["fake"], "--ref", sets["ref"], "--metrics", "fid")
    assert result["fid"] == pytest.approx(direct["fid"], rel=1e-9)
    assert "ffhq_256_train.npz" in result["reference"]
    table = capsys.readouterr().out
    assert "FID" in table and "IS" in table and "FID-10" in table


def test_adm_reference_batch_gives_statistics_for_fid_and_images_for_prc(pixel_weights, sets, tmp_path):
    images = smooth_images(10, seed=2, shift=30)
    stats_path = str(tmp_path / "ref_stats.npz")
    run(pixel_weights, "--fake", sets["ref"], "--save-stats", stats_path)
    saved = load_statistics(stats_path)
    np.savez(tmp_path / "adm_ref.npz", arr_0=images, mu=saved.mu, sigma=saved.sigma)
    adm = run(pixel_weights, "--fake", sets["fake"], "--ref", str(tmp_path / "adm_ref.npz"), "--metrics", "fid,prc")
    folder = run(pixel_weights, "--fake", sets["fake"], "--ref", sets["ref"], "--metrics", "fid,prc")
    assert "mu/sigma" in adm["reference"]
    assert adm["fid"] == pytest.approx(folder["fid"], rel=1e-9)
    assert (adm["precision"], adm["recall"]) == (folder["precision"], folder["recall"])


def test_mixed_image_sizes_are_resized_and_reported(pixel_weights, sets, tmp_path, capsys):
    folder = write_folder(tmp_path / "mixed", smooth_images(10, seed=3))
    Image.fromarray(smooth_images(1, seed=4, size=48)[0]).save(os.path.join(folder, "99999.png"))
    result = run(pixel_weights, "--fake", folder, "--ref", sets["ref"], "--metrics", "fid")
    assert result["num_images"] == 11 and "1 resized" in result["image_size"]
    assert "1 of 11 images" in capsys.readouterr().out


def test_accumulator_scores_float_images_as_their_uint8_rounding():
    images = torch.from_numpy(smooth_images(12, seed=1)).permute(0, 3, 1, 2)  # (12, 3, 32, 32) uint8
    from_uint8, from_float = InceptionAccumulator(PixelFeatures()), InceptionAccumulator(PixelFeatures())
    from_uint8.add(images)
    for part in (images[:5], images[5:]):
        from_float.add(part.float() / 127.5 - 1)
    assert len(from_float) == 12
    torch.testing.assert_close(from_float.gather()["2048"], from_uint8.gather()["2048"], rtol=0, atol=0)
    reference = InceptionAccumulator(PixelFeatures())
    reference.add(torch.from_numpy(smooth_images(12, seed=2, shift=30)).permute(0, 3, 1, 2))
    assert from_float.fid(reference) > 1
    assert from_float.fid(reference.statistics()) == pytest.approx(from_float.fid(reference), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2
# ---------------------------------------------------------------------------------------------

def test_empty_folder_is_refused(weights, sets, tmp_path, capsys):
    os.makedirs(tmp_path / "empty")
    line = refused(capsys, ["--fake", str(tmp_path / "empty"), "--ref", sets["ref"], "--inception-weights", weights])
    assert line.startswith("DataError") and "no images" in line


def test_statistics_file_without_mu_sigma_is_refused(weights, sets, tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", means=np.zeros(3))
    line = refused(capsys, ["--fake", sets["fake"], "--ref", str(tmp_path / "bad.npz"), "--inception-weights", weights])
    assert "'mu' and 'sigma'" in line and "bad.npz" in line


def test_mismatched_feature_dimensions_are_refused(weights, sets, tmp_path, capsys):
    np.savez(tmp_path / "dims64.npz", mu=np.zeros(64), sigma=np.eye(64))
    line = refused(capsys, ["--fake", sets["fake"], "--ref", str(tmp_path / "dims64.npz"), "--metrics", "fid",
                            "--inception-weights", weights, "--device", "cpu", "--num-workers", "0"])
    assert "feature dimensions differ" in line and "64" in line


@pytest.mark.parametrize("argv, phrase", [
    (["--metrics", "fid,kid"], "choose from fid,isc,prc"),
    (["--metrics", "prc", "--ref", "STATS"], "needs reference images"),
    (["--ref", "imagenet"], "imagenet_256_train.npz"),
    (["--ref", "nowhere.npz"], "no such file or folder"),
    (["ref_path=x"], "fake_path=SAMPLES and ref_dataset=NAME"),
])
def test_bad_command_lines_are_refused(weights, sets, tmp_path, capsys, argv, phrase):
    np.savez(tmp_path / "stats.npz", mu=np.zeros(8), sigma=np.eye(8))
    argv = [str(tmp_path / "stats.npz") if token == "STATS" else token for token in argv]
    if "--ref" not in argv:
        argv += ["--ref", sets["ref"]]
    line = refused(capsys, ["--fake", sets["fake"], *argv, "--inception-weights", weights,
                            "--stats-dir", str(tmp_path)])
    assert phrase in line


def test_missing_weights_name_the_file_where_to_put_it_and_where_it_is_published(sets, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(WeightsError) as error:
        find_inception_weights(None)
    message = str(error.value)
    assert INCEPTION_FILE in message and INCEPTION_URL in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message and "--inception-weights" in message
    script = os.path.join(REPO, "compute_metrics.py")
    completed = subprocess.run([sys.executable, script, "--fake", sets["fake"], "--ref", sets["ref"],
                                "--inception-weights", str(tmp_path / "missing.pth")],
                               capture_output=True, text=True, cwd=REPO)
    assert completed.returncode == 2
    assert completed.stderr.strip().count("\n") == 0
    assert "WeightsError" in completed.stderr and INCEPTION_FILE in completed.stderr


def test_a_file_that_is_not_inception_weights_is_refused(tmp_path):
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="not torch-fidelity's Inception weights"):
        load_inception(str(tmp_path / "other.pth"))


def test_an_unreadable_image_is_named(pixel_weights, sets, tmp_path, capsys):
    folder = write_folder(tmp_path / "broken", smooth_images(10, seed=9))
    with open(os.path.join(folder, "00003.png"), "wb") as handle:
        handle.write(b"not a png")
    with pytest.raises(SystemExit) as exit_info:
        run(pixel_weights, "--fake", folder, "--ref", sets["ref"], "--metrics", "fid")
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert last_line.startswith("DataError") and "00003.png: cannot read image" in last_line


def test_too_few_images_for_the_inception_score_is_refused(weights, tmp_path, capsys):
    folder = write_folder(tmp_path / "few", smooth_images(4, seed=5))
    line = refused(capsys, ["--fake", folder, "--ref", folder, "--metrics", "isc", "--inception-weights", weights,
                            "--device", "cpu", "--num-workers", "0"])
    assert "Inception Score needs at least 10 images, got 4" in line


# ---------------------------------------------------------------------------------------------
# Image inputs and distributed extraction
# ---------------------------------------------------------------------------------------------

def test_npz_batches_are_memory_mapped_when_stored_uncompressed(tmp_path):
    images = smooth_images(5, seed=6)
    np.savez(tmp_path / "plain.npz", arr_0=images)
    np.savez_compressed(tmp_path / "packed.npz", arr_0=images)
    plain, packed = open_npz_array(str(tmp_path / "plain.npz"), "arr_0"), open_npz_array(str(tmp_path / "packed.npz"),
                                                                                         "arr_0")
    assert isinstance(plain, np.memmap)
    np.testing.assert_array_equal(plain, images)
    np.testing.assert_array_equal(packed, images)


def extract_in_rank(rank: int, world_size: int, port: int, folder: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env = dist.setup("cpu")
    accumulator = InceptionAccumulator(PixelFeatures())
    extract_features(FolderImages(folder), accumulator, env, batch_size=2, num_workers=0)
    features = accumulator.gather()
    if env.is_main:
        torch.save(features, out)
    dist.cleanup()


def test_sharded_extraction_gathers_the_same_features_in_dataset_order(tmp_path):
    folder = write_folder(tmp_path / "seven", smooth_images(7, seed=7, size=8))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(extract_in_rank, args=(2, port, folder, str(tmp_path / "two.pt")), nprocs=2)
    sharded = torch.load(tmp_path / "two.pt", weights_only=True)
    single = InceptionAccumulator(PixelFeatures())
    extract_features(FolderImages(folder), single, dist.DistEnv(0, 1, 0, torch.device("cpu")), batch_size=3,
                     num_workers=0)
    for layer, features in single.gather().items():
        torch.testing.assert_close(sharded[layer], features, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Reconstruction metrics
# ---------------------------------------------------------------------------------------------

def lfq_batch():
    """Open-MAGVIT2 evaluation.py's inputs: clamp, (v + 1) / 2 * 255 truncated to uint8."""
    data = np.load(os.path.join(DATA, "lfq_eval_batch.npz"))
    as_uint8 = [(255 * (torch.from_numpy(data[key]).clamp(-1, 1) + 1) / 2).to(torch.uint8) for key in ("images", "rec")]
    return data, *as_uint8


def test_psnr_on_known_pairs():
    x = torch.full((2, 3, 8, 8), 0.5, dtype=torch.float64)
    assert psnr(x, x + 0.1).tolist() == pytest.approx([20.0, 20.0])
    gray = torch.full((1, 3, 8, 8), 128, dtype=torch.uint8)
    assert psnr(gray, gray + 10).item() == pytest.approx(10 * np.log10(255 ** 2 / 100))
    assert psnr(gray, gray).item() == float("inf")


def test_psnr_reproduces_open_magvit2_batch_psnr():
    data, images, rec = lfq_batch()
    batch_psnr = psnr(images.reshape(1, -1, 32, 32), rec.reshape(1, -1, 32, 32)).item()
    assert batch_psnr == pytest.approx(float(data["psnr_batch"]), abs=1e-4)


def test_ssim_uniform_window_reproduces_open_magvit2_per_image_ssim():
    data, images, rec = lfq_batch()
    np.testing.assert_allclose(ssim(rec, images, window="uniform").numpy(), data["ssim_per_image"], atol=1e-4)


def test_ssim_of_constant_images_has_the_closed_form():
    for window in ("gaussian", "uniform"):
        a, b = 0.3, 0.7
        value = ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b), window=window).item()
        c1 = 0.01 ** 2
        assert value == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))
        images = torch.rand(2, 3, 16, 16)
        assert ssim(images, images, window=window).tolist() == pytest.approx([1.0, 1.0])


def test_ssim_gaussian_window_matches_scipy_gaussian_filtering():
    rng = np.random.default_rng(8)
    x = rng.random((2, 3, 24, 20))
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1)
    blur = lambda image: scipy.ndimage.gaussian_filter(image, sigma=1.5, truncate=3.5, mode="reflect")  # noqa: E731
    expected = []
    for xi, yi in zip(x, y):
        per_channel = []
        for a, b in zip(xi, yi):
            mu_a, mu_b = blur(a), blur(b)
            var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
            c1, c2 = 0.01 ** 2, 0.03 ** 2
            s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
            per_channel.append(s[5:-5, 5:-5].mean())
        expected.append(np.mean(per_channel))
    np.testing.assert_allclose(ssim(torch.from_numpy(x), torch.from_numpy(y)).numpy(), expected, rtol=1e-10)


def test_uint8_and_unit_float_images_score_alike():
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    noisy = (images.int() + torch.randint(-9, 10, images.shape)).clamp(0, 255).to(torch.uint8)
    torch.testing.assert_close(psnr(images, noisy), psnr(images / 255, noisy / 255))
    torch.testing.assert_close(ssim(images, noisy), ssim(images.double() / 255, noisy.double() / 255))


def test_ssim_refuses_images_smaller_than_its_window():
    with pytest.raises(DataError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_codebook_usage_and_perplexity():
    assert codebook_usage(torch.tensor([[0, 0], [1, 1]]), 4) == {"usage": 0.5, "perplexity": pytest.approx(2.0)}
    assert codebook_usage(torch.arange(8).repeat(3), 8)["perplexity"] == pytest.approx(8.0)
    data, _, _ = lfq_batch()
    usage = codebook_usage(torch.from_numpy(data["indices"]), 256)
    assert usage["usage"] == float(data["codebook_utilization"]) == int(data["unique_indices"]) / 256
    halves = code_counts(torch.arange(7), 8) + code_counts(torch.tensor([0, 7]), 8)
    assert usage_from_counts(halves)["usage"] == 1.0
    with pytest.raises(DataError, match="vocabulary of 4"):
        codebook_usage(torch.tensor([0, 4]), 4)


def test_reconstruction_meter_averages_over_images():
    from common.losses import LPIPS

    with pytest.warns(UserWarning, match="RANDOM"):
        lpips = LPIPS(random_trunk=True)
    torch.manual_seed(0)
    real = torch.rand(5, 3, 32, 32) * 2 - 1
    fake = (real + 0.1 * torch.randn_like(real)).clamp(-1, 1)
    meter = ReconstructionMeter(lpips)
    meter.update(real[:2], fake[:2])
    meter.update(real[2:], fake[2:])
    result = meter.compute()
    to_u8 = lambda images: ((images + 1) / 2 * 255).round().to(torch.uint8)  # noqa: E731
    assert result["num_images"] == 5
    assert result["psnr"] == pytest.approx(psnr(to_u8(real), to_u8(fake)).mean().item(), rel=1e-9)
    assert result["ssim"] == pytest.approx(ssim(to_u8(real), to_u8(fake)).mean().item(), rel=1e-9)
    assert result["lpips"] == pytest.approx(lpips(real, fake).mean().item(), rel=1e-5)
    identical = ReconstructionMeter(lpips)
    identical.update(real, real)
    assert identical.compute()["lpips"] == pytest.approx(0.0, abs=1e-7)


def test_statistics_need_two_images():
    with pytest.raises(DataError, match="at least 2 images"):
        FIDStatistics.from_features(torch.zeros(1, 2048), "one.png")
