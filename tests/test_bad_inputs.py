"""Every entry script over a table of bad inputs: each ends in one clear line and leaves nothing behind.

For every case: a non-zero exit, no traceback, a last line on stderr that names the problem and the
file, flag or key, nothing new anywhere under the test's folder (no output folder, no rfid.json beside a
checkpoint), and no marker file: the crafted pickles here would create it if anything unpickled them.
The scripts run in this process (their `main(argv)`, output captured at the file descriptors, so
DataLoader workers are heard too); one case runs as a real process.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import compute_metrics
import compute_rfid
import main_cache
import main_mar
import main_sampling_fid
import main_stage1
import main_stage2
from common.checkpoint import save_checkpoint
from common.config import Config, read_yaml
from common.errors import WeightsError
from common.metrics import load_inception, write_random_inception_weights
from methods import load_tokenizer
from rqvae.vqvae import RQVAE
from scripts import extract_codes, quickstart, reconstruct, sample
from tests.helpers import DATA, run_cli

ENTRIES = {module.__name__.split(".")[-1]: module.main for module in (
    main_stage1, main_stage2, sample, main_sampling_fid, reconstruct, extract_codes, compute_metrics, compute_rfid,
    main_cache, main_mar)}


class MarkerWriter:
    """Pickled, this becomes a call that creates `path`: what a crafted weights file would run on loading."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def write_images(folder, count: int, broken: bool = False) -> str:
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for i in range(count):
        path = os.path.join(folder, f"{i:03d}.png")
        if broken:
            with open(path, "wb") as f:
                f.write(b"not a png at all")
        else:
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return str(folder)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """The bad (and the few good) files of the table, made once; `root` holds them all."""
    root = tmp_path_factory.mktemp("bad_inputs")
    marker = str(root / "MARKER")
    # the official tiny RQ-VAE / RQ-Transformer, copied: a run that should have been refused writes nothing in tests/
    for stage in ("stage1", "stage2"):
        shutil.copytree(os.path.join(DATA, "rqvae", stage), root / stage)
    torch.save({"model": MarkerWriter(marker)}, root / "evil.pt")
    torch.save({"model": MarkerWriter(marker)}, root / "evil_legacy.pt", _use_new_zipfile_serialization=False)
    (root / "evil_raw.pkl").write_bytes(pickle.dumps({"model": MarkerWriter(marker)}, protocol=2))
    os.makedirs(root / "evil_mar")
    shutil.copy(root / "evil.pt", root / "evil_mar" / "checkpoint-last.pth")
    (root / "page.html").write_text("<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n")
    (root / "noise.pt").write_bytes(bytes(range(7, 250)))
    (root / "blocker").write_text("a file where a folder is expected\n")
    (root / "latin1.yaml").write_bytes("arch: {type: rq-vae}  # caf\xe9\n".encode("latin-1"))
    os.makedirs(root / "folder.pt")

    write_images(root / "images", 10)
    write_images(root / "broken", 4, broken=True)
    os.makedirs(root / "bad_shard")
    (root / "bad_shard" / "meta.json").write_text(json.dumps({"num_shards": 1, "kind": "discrete"}))
    (root / "bad_shard" / "codes_00000.npz").write_bytes(b"\x93NUMPY truncated")
    os.makedirs(root / "bad_meta")
    (root / "bad_meta" / "meta.json").write_text("{\"num_shards\": 1,")

    arch = read_yaml(os.path.join(DATA, "rqvae", "stage1", "config.yaml"))["arch"]
    save_checkpoint(str(root / "other_rqvae.pt"), {"config": {"arch": arch}, "kind": "rq-vae",
                                                    "model": RQVAE.from_config(arch).state_dict()})
    save_checkpoint(str(root / "prior.pt"), {"config": {"arch": {"type": "rq-transformer"}}, "kind": "rq-transformer",
                                             "model": {}})
    lfq, lfq_config = load_tokenizer(os.path.join(DATA, "lfq", "small_lfq.ckpt"),
                                     os.path.join(DATA, "lfq", "small_config.yaml"))
    save_checkpoint(str(root / "lfq.pt"), {"config": Config(lfq_config).to_dict(), "kind": "lfq",
                                           "model": lfq.state_dict()})
    write_random_inception_weights(str(root / "inception.pth"))
    return {"root": str(root), "marker": marker, "out": str(root / "out"),
            "folder_pt": str(root / "folder.pt"),
            **{name.split(".")[0]: str(root / name) for name in (
                "evil.pt", "evil_legacy.pt", "evil_raw.pkl", "evil_mar", "page.html", "noise.pt", "blocker",
                "latin1.yaml", "images", "broken", "bad_shard", "bad_meta", "other_rqvae.pt", "prior.pt", "lfq.pt",
                "inception.pth")},
            "stage1": str(root / "stage1" / "model.pt"), "stage2": str(root / "stage2" / "model.pt")}


STAGE1 = ["-m", "configs/shapes/stage1/rqvae.yaml", "-r", "{out}", "dataset.resolution=16", "dataset.num_samples=16",
          "arch.ddconfig.resolution=16", "arch.ddconfig.ch_mult=[1,2]", "arch.hparams.latent_shape=[8,8,32]",
          "arch.hparams.n_embed=32", "experiment.batch_size=8", "--device", "cpu"]
STAGE2 = ["-m", "configs/shapes/stage2/rqtransformer.yaml", "-r", "{out}", "-v", "{stage1}", "dataset.resolution=16",
          "dataset.num_samples=16", "arch.block_size=[8,8,3]", "arch.embed_dim=32", "arch.body.n_layer=1",
          "arch.head.n_layer=1", "experiment.batch_size=8", "--device", "cpu"]
SAMPLE = ["-v", "{stage1}", "-a", "{stage2}", "--device", "cpu", "--output", "{out}"]
FID = ["-v", "{stage1}", "-a", "{stage2}", "--device", "cpu", "-n", "16", "-bs", "16", "--save-dir", "{out}",
       "--inception-weights", "{inception}"]
RECONSTRUCT = ["--ckpt", "{stage1}", "--input", "{images}", "--output", "{out}", "--device", "cpu"]
EXTRACT = ["--tokenizer", "{stage1}", "--data-root", "{images}", "--output", "{out}", "--device", "cpu",
           "--num-workers", "0"]
METRICS = ["--fake", "{images}", "--ref", "{images}", "--metrics", "fid", "--inception-weights", "{inception}",
           "--device", "cpu", "--num-workers", "0"]
RFID_WITH_LPIPS = ["--vqvae", "{stage1}", "--data-root", "{images}", "--inception-weights", "{inception}",
                   "--device", "cpu", "--num-workers", "0", "--batch-size", "4"]
RFID = [*RFID_WITH_LPIPS, "--no-lpips"]
CACHE = ["--dataset", "shapes", "--num_images", "4", "--img_size", "16", "--vae_path", "{stage1}", "--vae_embed_dim",
         "8", "--cached_path", "{out}", "--device", "cpu", "--num_workers", "0"]
MAR = ["--evaluate", "--output_dir", "{out}", "--device", "cpu", "--num_workers", "0"]

REFUSED_CODE = "refused, the file contains Python objects or code"
UNDER_A_FILE = "lies under {root}/blocker, which is a file"

CASES = [
    # 1. pickled code in every weights or checkpoint file a user names: refused before anything runs
    *[pytest.param(script, [*base, flag, "{%s}" % evil], [REFUSED_CODE, "{%s}" % evil], id=f"{script}{flag}-{evil}")
      for script, base, flag in [
          ("compute_metrics", METRICS, "--inception-weights"), ("compute_rfid", RFID, "--inception-weights"),
          ("compute_rfid", RFID, "--vqvae"), ("main_sampling_fid", FID, "--inception-weights"),
          ("main_sampling_fid", FID, "-v"), ("main_sampling_fid", FID, "-a"), ("sample", SAMPLE, "-v"),
          ("sample", SAMPLE, "-a"), ("reconstruct", RECONSTRUCT, "--ckpt"), ("extract_codes", EXTRACT, "--tokenizer"),
          ("main_stage1", STAGE1, "-l"), ("main_stage2", STAGE2, "-v"), ("main_stage2", STAGE2, "-l"),
          ("main_cache", CACHE, "--vae_path")]
      for evil in ("evil", "evil_legacy", "evil_raw") if evil == "evil" or flag == "--ckpt"],
    pytest.param("compute_rfid", [*RFID_WITH_LPIPS, "--vgg-weights", "{evil}"], [REFUSED_CODE, "{evil}"],
                 id="compute_rfid--vgg-weights"),
    pytest.param("main_stage1", [*STAGE1, "gan.loss.perceptual_weight=1.0", "--vgg-weights", "{evil}"],
                 [REFUSED_CODE, "{evil}"], id="main_stage1--vgg-weights"),
    pytest.param("main_stage1", [*STAGE1, "--resume", "-l", "{evil}"], [REFUSED_CODE, "{evil}"],
                 id="main_stage1--resume"),
    pytest.param("main_mar", [*MAR, "--resume", "{evil_mar}", "--vae_path", "{evil}"], [REFUSED_CODE, "evil"],
                 id="main_mar--resume"),
    # 2. output locations that cannot be written
    pytest.param("main_stage1", [*STAGE1, "-r", "{blocker}/runs"], ["-r/--result-path", UNDER_A_FILE], id="stage1-r"),
    pytest.param("reconstruct", [*RECONSTRUCT, "--output", "{blocker}/recon"], ["--output", UNDER_A_FILE],
                 id="reconstruct--output"),
    pytest.param("reconstruct", [*RECONSTRUCT, "--output", "{blocker}"], ["--output {blocker}: is a file"],
                 id="reconstruct--output-file"),
    pytest.param("sample", [*SAMPLE, "--output", "{blocker}/samples"], ["--output", UNDER_A_FILE], id="sample--output"),
    pytest.param("compute_metrics", [*METRICS, "--save-stats", "{blocker}/stats.npz"], ["--save-stats", UNDER_A_FILE],
                 id="compute_metrics--save-stats"),
    pytest.param("main_sampling_fid", [*FID, "--save-dir", "{blocker}/fid"], ["--save-dir", UNDER_A_FILE],
                 id="main_sampling_fid--save-dir"),
    pytest.param("extract_codes", [*EXTRACT, "--output", "{blocker}/codes"], ["--output", UNDER_A_FILE],
                 id="extract_codes--output"),
    # 3. zero or negative sizes and counts
    pytest.param("main_stage1", [*STAGE1, "experiment.batch_size=0"], ["experiment.batch_size must be at least 1"],
                 id="stage1-batch_size"),
    pytest.param("main_stage1", [*STAGE1, "experiment.epochs=-1"], ["experiment.epochs must be at least 1, got -1"],
                 id="stage1-epochs"),
    pytest.param("main_stage1", [*STAGE1, "arch.hparams.code_shape=[8,8,0]"], ["arch.hparams.code_shape", "at least 1"],
                 id="stage1-code_shape"),
    pytest.param("main_stage2", [*STAGE2, "experiment.batch_size=-2"], ["experiment.batch_size must be at least 1"],
                 id="stage2-batch_size"),
    pytest.param("reconstruct", [*RECONSTRUCT, "--batch-size", "0"], ["--batch-size: must be at least 1, got 0"],
                 id="reconstruct--batch-size"),
    pytest.param("extract_codes", [*EXTRACT, "--shard-size", "0"], ["--shard-size: must be at least 1"],
                 id="extract_codes--shard-size"),
    pytest.param("extract_codes", [*EXTRACT, "--num-images", "0"], ["--num-images: must be at least 1"],
                 id="extract_codes--num-images"),
    pytest.param("compute_metrics", [*METRICS, "--batch-size", "0"], ["--batch-size: must be at least 1"],
                 id="compute_metrics--batch-size"),
    pytest.param("compute_rfid", [*RFID, "--batch-size", "-1"], ["--batch-size: must be at least 1"],
                 id="compute_rfid--batch-size"),
    pytest.param("main_sampling_fid", [*FID, "-n", "0"], ["-n/--n-samples: must be at least 1"], id="fid-n"),
    pytest.param("sample", [*SAMPLE, "-n", "0"], ["-n must be at least 1"], id="sample-n"),
    pytest.param("main_cache", [*CACHE, "--batch_size", "0"], ["--batch_size must be a positive int"],
                 id="main_cache--batch_size"),
    # 4. files that are not what they claim
    pytest.param("main_stage1", [*STAGE1, "-m", "{latin1}"], ["{latin1}", "not a text file"],
                 id="yaml-not-utf8"),
    pytest.param("main_stage1", [*STAGE1, "-m", "{root}"], ["{root}: a folder, not a config file"],
                 id="yaml-a-folder"),
    pytest.param("main_stage2", [*STAGE2, "loss.type=cross_entropy", "codes.train={bad_shard}"],
                 ["{bad_shard}/codes_00000.npz", "damaged code shard"], id="corrupt-shard"),
    pytest.param("main_stage2", [*STAGE2, "loss.type=cross_entropy", "codes.train={bad_meta}"],
                 ["{bad_meta}/meta.json", "not valid JSON"], id="malformed-shard-meta"),
    pytest.param("compute_metrics", [*METRICS, "--inception-weights", "{page}"], ["{page}", "HTML"],
                 id="inception-html"),
    pytest.param("compute_metrics", [*METRICS, "--inception-weights", "{stage1}"],
                 ["{stage1}", "not torch-fidelity's Inception weights"], id="inception-other-network"),
    pytest.param("compute_metrics", [*METRICS, "--inception-weights", "{folder_pt}"], ["{folder_pt}", "is a folder"],
                 id="inception-a-folder"),
    pytest.param("compute_rfid", [*RFID, "--inception-weights", "{noise}"], ["{noise}", "not a PyTorch"],
                 id="inception-noise"),
    pytest.param("sample", [*SAMPLE, "-a", "{page}"], ["{page}", "HTML"], id="prior-html"),
    pytest.param("reconstruct", [*RECONSTRUCT, "--ckpt", "{noise}"], ["{noise}", "not a PyTorch checkpoint"],
                 id="checkpoint-noise"),
    pytest.param("reconstruct", [*RECONSTRUCT, "--ckpt", "{folder_pt}"], ["{folder_pt}: a folder, not a checkpoint"],
                 id="checkpoint-a-folder"),
    # 5. the wrong model for the job
    pytest.param("main_stage1", [*STAGE1, "--resume", "-l", "{prior}"], ["{prior}", "'rq-transformer' model"],
                 id="resume-another-kind"),
    pytest.param("main_stage1", [*STAGE1, "--resume", "-l", "{other_rqvae}"],
                 ["{other_rqvae}", "weights do not fit"], id="resume-another-shape"),
    pytest.param("main_stage1", [*STAGE1, "-l", "{other_rqvae}"], ["{other_rqvae}", "weights do not fit"],
                 id="load-another-shape"),
    pytest.param("main_stage1", [*STAGE1, "-l", "{prior}"], ["{prior}", "not a tokenizer"],
                 id="load-a-prior"),
    pytest.param("main_stage1", [*STAGE1, "-l", os.path.join(DATA, "lfq", "small_lfq.ckpt")],
                 ["small_lfq.ckpt: an Open-MAGVIT2 tokenizer, and the config trains a RQVAE"], id="load-another-method"),
    pytest.param("main_stage1", [*STAGE1, "-l", os.path.join(DATA, "mar", "vae_tiny.ckpt")],
                 ["vae_tiny.ckpt: not weights of this config's tokenizer (RQVAE)"], id="load-an-official-kl-vae"),
    pytest.param("main_stage2", [*STAGE2, "-v", "{lfq}"], ["read an RQ-VAE's codebook", "LFQ"],
                 id="rq-transformer-on-lfq"),
    pytest.param("main_stage2", [*STAGE2, "-l", "{stage1}"], ["{stage1}", "not a RQTransformer checkpoint"],
                 id="stage2-load-a-tokenizer"),
    pytest.param("sample", [*SAMPLE, "-v", "{prior}"], ["{prior}", "not a tokenizer"], id="sample-prior-as-v"),
    # 6. errors inside DataLoader workers
    pytest.param("extract_codes", [*EXTRACT, "--data-root", "{broken}", "--num-workers", "1"],
                 ["DataError: none of the 4 images under {broken} can be read"], id="extract-workers"),
    pytest.param("compute_rfid", [*RFID, "--data-root", "{broken}", "--num-workers", "1"],
                 ["DataError: none of the 4 images under {broken} can be read"], id="rfid-workers"),
    # 7. start-up failures leave no run directory
    pytest.param("main_stage1", [*STAGE1, "dataset.type=folder", "dataset.root={root}/missing"],
                 ["dataset.root", "{root}/missing"], id="stage1-missing-data"),
    # 8. messages that misled
    pytest.param("main_stage1", [*STAGE1, "--bogus"], ["--bogus: unknown option"], id="unknown-flag"),
]


def tree(root: str) -> set[str]:
    return {os.path.relpath(os.path.join(folder, name), root)
            for folder, folders, names in os.walk(root) for name in folders + names}


@pytest.mark.parametrize("script, argv, fragments", CASES)
def test_bad_input_ends_in_one_clear_line_and_leaves_nothing(files, capfd, script, argv, fragments):
    before = tree(files["root"])
    try:
        ENTRIES[script]([arg.format(**files) for arg in argv])
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None), out
    assert "Traceback" not in out + err, err
    assert lines, out
    for fragment in fragments:
        assert fragment.format(**files) in lines[-1], err
    assert tree(files["root"]) == before
    assert not os.path.exists(files["marker"])


def test_inception_weights_are_never_unpickled_by_any_loader(files):
    for evil in ("evil", "evil_legacy", "evil_raw"):
        with pytest.raises(WeightsError, match="Python objects or code"):
            load_inception(files[evil])
        inception, reason = quickstart.find_inception(files[evil])
        assert inception is None and "Python objects or code" in reason
    assert not os.path.exists(files["marker"])
    assert load_inception(files["inception"]).fc.weight.shape == (1008, 2048)  # a real file still loads


def test_as_a_process_with_several_workers_the_last_line_is_the_error(files):
    result = run_cli("scripts/extract_codes.py", *[arg.format(**files) for arg in EXTRACT], "--data-root",
                     files["broken"], "--num-workers", "2")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout, result.stderr
    assert lines[-1] == f"DataError: none of the 4 images under {files['broken']} can be read; check dataset.root"
    assert not os.path.exists(files["out"])
