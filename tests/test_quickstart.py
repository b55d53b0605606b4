"""The quickstart, in its smoke-test size, runs end to end and writes what the README promises."""
import json

from common.metrics import write_random_inception_weights
from tests.helpers import run_cli


def test_quickstart_fast_writes_grids_metrics_and_summary(tmp_path):
    weights = write_random_inception_weights(str(tmp_path / "inception.pth"))  # random: only the code path is tested
    out = tmp_path / "quickstart"
    result = run_cli("scripts/quickstart.py", "--fast", "--method", "rqvae", "--output", str(out),
                     "--inception-weights", weights, "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.load(open(out / "metrics.json"))
    recon = metrics["rqvae"]["stage1_reconstruction"]
    assert recon["psnr"] > 5 and 0 < recon["usage_d0"] <= 1 and "rfid" in recon
    assert {"fid", "is_mean", "is_std", "shapes_accuracy", "shapes_fd"} <= set(metrics["rqvae"]["samples"]["cfg3"])
    assert recon["shapes_rfd"] >= 0 and 0 <= recon["shapes_recon_accuracy"] <= 1
    assert metrics["rqvae"]["files"]["curves"] == "curves.png"
    assert 0 <= metrics["rqvae"]["samples"]["txt2img"]["shapes_accuracy"] <= 1
    for name in ("reconstructions.png", "samples_cfg1.png", "samples_cfg3.png", "samples_txt2img.png", "curves.png",
                 "runs/rqvae/last.pt", "runs/rqtransformer/last.pt", "runs/rqtransformer-t2i/last.pt"):
        assert (out / "rqvae" / name).is_file()
    assert "Quickstart summary" in result.stdout and "PSNR" in result.stdout and "shapes accuracy" in result.stdout


def test_quickstart_fast_next_patch_prediction_on_its_own_tokenizer(tmp_path):
    out = tmp_path / "quickstart"
    result = run_cli("scripts/quickstart.py", "--fast", "--method", "npp", "--output", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["npp"]["tokenizer"].endswith("lfq/last.pt") and "fid_skipped" in metrics
    assert 0 <= metrics["npp"]["samples"]["cfg1"]["shapes_accuracy"] <= 1  # scored without Inception
    for name in ("samples_cfg1.png", "samples_cfg3.png", "runs/lfq/last.pt", "runs/npp-gpt/last.pt"):
        assert (out / "npp" / name).is_file()


def test_quickstart_fast_mar_caches_latents_trains_and_samples(tmp_path):
    out = tmp_path / "quickstart"
    result = run_cli("scripts/quickstart.py", "--fast", "--method", "mar", "--output", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.load(open(out / "metrics.json"))
    recon = metrics["mar"]["stage1_reconstruction"]
    assert recon["psnr"] > 5 and not any(key.startswith("usage") for key in recon)  # a KL VAE has no codebook
    for name in ("reconstructions.png", "samples_cfg1.png", "samples_cfg3.png", "runs/kl-vae/last.pt",
                 "runs/mar/last.pt", "cache/00_circle"):
        assert (out / "mar" / name).exists()
