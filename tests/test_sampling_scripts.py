"""Sampling entry points: scripts/sample.py, main_sampling_fid.py, methods.load_prior, measure_throughput.

The official tiny RQ-VAE / RQ-Transformer pair (tests/data/rqvae/: 16x16 images, 8x8x3 codes of a
32-code book, 16 classes) and its reference greedy codes pin the script path to the official sampler.
"""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import main_sampling_fid
from common.checkpoint import save_checkpoint
from common.config import read_yaml
from common.data import derive_seed, to_uint8
from common.errors import CheckpointError
from common.metrics import FIDStatistics, load_statistics, write_random_inception_weights
from common.metrics.images import NpzImages
from measure_throughput.__main__ import main as measure_throughput
from common.sampler import parse_sampling_args, sampling_parser
from methods import load_prior, load_sampler, sampling_knob_schemas
from rqvae.official import export_official_rqvae, load_official_rqvae
from rqvae.transformer import RQTransformer
from rqvae.vqvae import RQVAE
from scripts import sample
from tests.helpers import DATA, assert_one_line_error, run_cli, run_in_process

STAGE1 = os.path.join(DATA, "rqvae", "stage1", "model.pt")
STAGE2 = os.path.join(DATA, "rqvae", "stage2", "model.pt")
MODELS = ["-v", STAGE1, "-a", STAGE2, "--device", "cpu"]
# main_sampling_fid.py in one process and in two (tests/two_process_runs.py): the same images, batch by batch
SHARDED_SAMPLING = [*MODELS, "-n", "16", "-bs", "4", "--no-stats-saving", "--seed", "7"]


@pytest.fixture(scope="module")
def vectors():
    return torch.load(os.path.join(DATA, "rqvae", "stage2_vectors.pt"), weights_only=True)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    return write_random_inception_weights(str(tmp_path_factory.mktemp("inception") / "inception.pth"))


def sampled_dir(save_dir) -> str:
    (npz,) = glob.glob(os.path.join(str(save_dir), "**", "samples.npz"), recursive=True)
    return os.path.dirname(npz)


# ----------------------------------------------------------------------------------------------
# scripts/sample.py
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weights, key", [("--no-ema", "greedy_codes"), ("--ema", "greedy_codes_ema")])
def test_sample_script_reproduces_the_official_greedy_codes(tmp_path, vectors, weights, key):
    sample.main([*MODELS, "--classes", "0", "13", "--top-k", "1", weights, "--output", str(tmp_path)])
    codes = np.load(tmp_path / "codes.npy")
    assert codes.dtype == np.int64 and codes.shape == (2, 8, 8, 3)
    assert torch.equal(torch.from_numpy(codes), vectors[key])
    assert sorted(os.listdir(tmp_path)) == ["00000.png", "00001.png", "codes.npy", "grid.png"]
    if key == "greedy_codes":  # the official PNGs truncate, ours round: at most one level apart
        pixels = np.stack([np.asarray(Image.open(tmp_path / f"{i:05d}.png")) for i in range(2)]).astype(int)
        assert np.abs(pixels - vectors["greedy_png_u8_nhwc"].numpy().astype(int)).max() <= 1


def test_sample_script_sampler_draws_the_same_codes_cached_and_uncached():
    args, assignments = parse_sampling_args(sampling_parser("", sampling_knob_schemas()),
                                            [*MODELS, "-t", "0.8", "--top-k", "6", "top_p=0.85", "--seed", "5"])
    sampler = load_sampler(args, assignments, torch.device("cpu"))
    assert sampler.knobs == {"temperature": 0.8, "top_k": [6, 6, 6], "top_p": [0.85, 0.85, 0.85], "cfg_scale": 1.0}
    labels = torch.tensor([3, 9])
    codes, images = sampler.generate(labels, seed=5, batch_index=2)
    generator = torch.Generator().manual_seed(derive_seed(5, 2))
    uncached = sampler.prior.generate(labels, cached=False, generator=generator, **sampler.knobs)
    assert torch.equal(codes, uncached)
    assert images.shape == (2, 3, 16, 16) and images.min() >= -1 and images.max() <= 1


def test_sample_script_classes_and_counts(tmp_path):
    out = tmp_path / "out"
    sample.main([*MODELS, "--classes", "4", "2", "-n", "3", "-bs", "3", "--output", str(out)])
    codes = np.load(out / "codes.npy")
    assert codes.shape == (6, 8, 8, 3) and len(glob.glob(str(out / "*.png"))) == 7
    assert Image.open(out / "grid.png").size == (3 * 18 + 2, 2 * 18 + 2)  # one row of 3 per class, 2-px padding
    alone = tmp_path / "alone"  # the same seed and batches: the same first batch
    sample.main([*MODELS, "--classes", "4", "-n", "3", "-bs", "3", "--output", str(alone)])
    assert np.array_equal(np.load(alone / "codes.npy"), codes[:3])


# ----------------------------------------------------------------------------------------------
# methods.load_prior on our own stage-2 checkpoints
# ----------------------------------------------------------------------------------------------

def our_stage2(tmp_path, tokenizer) -> tuple[str, dict, dict]:
    """A stage-2 checkpoint in our format (as main_stage2.py writes it) with CFG, EMA and sampling defaults."""
    arch = {"type": "rq-transformer", "ema": True, "vocab_size": 32, "block_size": [8, 8, 3], "embed_dim": 16,
            "input_embed_dim": 8, "vocab_size_cond": 4, "block_size_cond": 1, "input_emb_vqvae": True,
            "head_emb_vqvae": True, "cumsum_depth_ctx": True, "shared_tok_emb": True, "shared_cls_emb": True,
            "body": {"n_layer": 1, "block": {"n_head": 2}}, "head": {"n_layer": 1, "block": {"n_head": 2}},
            "cfg_null_class": True}
    torch.manual_seed(0)
    prior = RQTransformer.from_config(arch)
    prior.set_codebook_from(tokenizer)
    raw = prior.state_dict()
    ema = {name: tensor + 0.01 if tensor.is_floating_point() and name != "codebook" else tensor
           for name, tensor in raw.items()}
    config = {"arch": arch, "vqvae": {"ckpt": STAGE1},
              "experiment": {"sample": {"top_k": 3, "top_p": 0.9, "temp": 0.7}}}
    path = str(tmp_path / "stage2.pt")
    save_checkpoint(path, {"config": config, "kind": "rq-transformer", "model": raw,
                           "ema": {"num_updates": 1, "shadow": ema}})
    return path, raw, ema


def test_load_prior_reads_our_checkpoints(tmp_path, capsys):
    tokenizer = load_official_rqvae(STAGE1).eval()
    path, raw, ema = our_stage2(tmp_path, tokenizer)
    prior, config, defaults = load_prior(path, tokenizer)
    assert not prior.training and config["vqvae"]["ckpt"] == STAGE1
    assert defaults == {"temperature": 0.7, "top_k": 3, "top_p": 0.9, "ema": True}
    assert torch.equal(prior.state_dict()["head_mlp.weight"], ema["head_mlp.weight"])
    prior, _, defaults = load_prior(path, tokenizer, use_ema=False)
    assert torch.equal(prior.state_dict()["head_mlp.weight"], raw["head_mlp.weight"]) and not defaults["ema"]

    out = tmp_path / "guided"
    sample.main(["-v", STAGE1, "-a", path, "--classes", "1", "3", "-n", "2", "--cfg", "2.5", "--device", "cpu",
                 "--output", str(out)])
    assert np.load(out / "codes.npy").shape == (4, 8, 8, 3)
    assert "temperature 0.7, top-k [3, 3, 3], top-p [0.9, 0.9, 0.9], cfg-scale 2.5, EMA" in capsys.readouterr().out

    retrained = load_official_rqvae(STAGE1)  # same shapes, but its codebook is not the prior's
    with torch.no_grad():
        retrained.quantizer.codebooks[0].weight.add_(0.5)
    with pytest.raises(CheckpointError, match="trained on the codes of another RQ-VAE.*it was trained with"):
        load_prior(path, retrained)
    with pytest.raises(CheckpointError, match="not a stage-2 checkpoint"):
        load_prior(STAGE1, tokenizer)


# ----------------------------------------------------------------------------------------------
# main_sampling_fid.py
# ----------------------------------------------------------------------------------------------

def test_main_sampling_fid_saves_pngs_adm_npz_and_scores(tmp_path, inception_weights):
    reference = str(tmp_path / "ref.npz")
    rng = np.random.default_rng(0)
    features = rng.normal(size=(4096, 2048)).astype(np.float32) * 0.1
    FIDStatistics(features.mean(0).astype(np.float64), np.cov(features, rowvar=False)).save(reference)
    results = main_sampling_fid.main([*MODELS, "-n", "16", "-bs", "8", "--save-dir", str(tmp_path / "runs"),
                                      "--inception-weights", inception_weights, "--ref-stats", reference])
    out = sampled_dir(tmp_path / "runs")
    assert out == results["out_dir"]
    assert os.path.relpath(out, tmp_path / "runs").startswith(
        os.path.join("rqvae_stage2", "logs_fid", "valid_ema", "model_temp_1.0_top_k_8_top_p_0.95"))
    assert {"fid", "is_mean", "is_std", "num_images", "seed", "temperature", "top_k", "top_p", "cfg_scale",
            "ema", "images_per_second"} <= set(results)
    assert results["num_images"] == 16 and np.isfinite(results["fid"]) and results["is_mean"] >= 1.0
    assert read_yaml(os.path.join(out, "metrics.json"))["fid"] == pytest.approx(results["fid"])

    with np.load(os.path.join(out, "samples.npz")) as npz:
        arr, labels = npz["arr_0"], npz["labels"]
        assert np.array_equal(npz["arr_1"], labels)
    assert arr.dtype == np.uint8 and arr.shape == (16, 16, 16, 3)
    assert np.array_equal(labels, np.arange(16))  # 16 classes, one image each, in contiguous blocks
    assert np.array_equal(np.asarray(NpzImages(os.path.join(out, "samples.npz")).images), arr)  # memory-mapped
    pngs = sorted(glob.glob(os.path.join(out, "samples", "*.png")))
    assert len(pngs) == 16 and np.array_equal(np.asarray(Image.open(pngs[5])), arr[5])
    assert load_statistics(os.path.join(out, "stats.npz")).num_images == 16
    assert os.path.isfile(os.path.join(out, "grid.png"))

    first = tmp_path / "first"  # sample.py with the same seed and batch size draws the same first batch
    sample.main([*MODELS, "-n", "8", "-bs", "8", "--output", str(first)])
    assert np.array_equal(np.stack([np.asarray(Image.open(first / f"{i:05d}.png")) for i in range(8)]), arr[:8])


def test_image_size_eval_resizes_the_decoded_samples_before_they_are_saved(tmp_path):
    """LlamaGen's --image-size-eval: the decoded values resized (bicubic), then clamped and quantised."""
    main_sampling_fid.main([*MODELS, "-n", "16", "-bs", "8", "--save-dir", str(tmp_path / "runs"), "--no-stats-saving",
                            "--image-size-eval", "24"])
    out = sampled_dir(tmp_path / "runs")
    with np.load(os.path.join(out, "samples.npz")) as npz:
        arr = npz["arr_0"]
    assert arr.shape == (16, 24, 24, 3) and read_yaml(os.path.join(out, "metrics.json"))["image_size"] == 24
    assert np.array_equal(np.asarray(Image.open(os.path.join(out, "samples", "00003.png"))), arr[3])
    args, assignments = parse_sampling_args(sampling_parser("", sampling_knob_schemas()), MODELS)
    sampler = load_sampler(args, assignments, torch.device("cpu"))
    codes, _ = sampler.generate(torch.arange(8), seed=0, batch_index=0)
    decoded = sampler.tokenizer.decode_tokens(codes).float()
    expected = to_uint8(F.interpolate(decoded, size=(24, 24), mode="bicubic").clamp(-1, 1))
    assert np.array_equal(arr[:8], expected.numpy())
    assert not np.array_equal(arr[:8], to_uint8(F.interpolate(decoded.clamp(-1, 1), size=(24, 24),
                                                               mode="bicubic").clamp(-1, 1)).numpy())


def test_sharded_sampling_on_two_processes_equals_one_process(two_process_runs, tmp_path):
    main_sampling_fid.main([*SHARDED_SAMPLING, "--save-dir", str(tmp_path / "one")])  # one thread, as each worker
    two = two_process_runs / "sampled"
    with np.load(os.path.join(sampled_dir(tmp_path / "one"), "samples.npz")) as one, \
            np.load(os.path.join(sampled_dir(two), "samples.npz")) as other:
        assert np.array_equal(one["arr_0"], other["arr_0"]) and np.array_equal(one["labels"], other["labels"])
        assert len(np.unique(one["arr_0"].reshape(16, -1), axis=0)) == 16  # every batch drew its own images
    assert len(glob.glob(os.path.join(sampled_dir(two), "samples", "*.png"))) == 16


# ----------------------------------------------------------------------------------------------
# measure_throughput
# ----------------------------------------------------------------------------------------------

def test_measure_throughput_smoke_run(capsys):
    threads = torch.get_num_threads()
    timings = measure_throughput(["f=32", "d=2", "c=64", "model=tiny", "batch_size=2", "n_loop=2", "warmup=1",
                                  "samples_per_loop=2", "device=cpu", "ch=32", f"threads={threads + 1}"])
    assert torch.get_num_threads() == threads  # the benchmark's thread count does not outlive it
    assert set(timings) == {"ms_per_sample", "ms_per_sample_ar", "ms_per_sample_decode"}
    assert timings["ms_per_sample_ar"] > 0 and timings["ms_per_sample_decode"] > 0
    out = capsys.readouterr().out
    assert "f32-tiny-d2-c64-bs2" in out and "ms/sample (ar:" in out


# ----------------------------------------------------------------------------------------------
# Bad input: one clear line, exit status 2
# ----------------------------------------------------------------------------------------------

def test_stage2_with_a_stage1_of_another_codebook_shape_is_refused(tmp_path):
    arch = read_yaml(os.path.join(DATA, "rqvae", "stage1", "config.yaml"))["arch"]
    arch["hparams"]["n_embed"] = 16
    other = str(tmp_path / "other_stage1" / "model.pt")
    export_official_rqvae(RQVAE.from_config(arch), arch, other)
    result = run_cli("scripts/sample.py", "-v", other, "-a", STAGE2, "--device", "cpu", "--output", str(tmp_path))
    assert_one_line_error(result, "CheckpointError", "shared codebook of 32 codes", "got 16 codes")


@pytest.mark.parametrize("main, argv, fragments", [
    (sample.main, ["--classes", "3", "16"], ["DataError: --classes 16", "lie in [0, 16)"]),
    (sample.main, ["--top-k", "0"], ["ConfigError: --top-k must be >= 1, got 0"]),
    (sample.main, ["--top-k", "4", "5"], ["ConfigError: --top-k takes one value or one per depth (3)"]),
    (sample.main, ["--cfg", "2"], ["ConfigError: --cfg 2.0", "not trained for classifier-free guidance"]),
    (sample.main, ["--image-size", "32"], ["ConfigError: --image-size 32: this tokenizer's code grid is fixed by its "
                                           "config (8x8x3); it works at 16 px only"]),
    (main_sampling_fid.main, ["-n", "32", "-bs", "12"], ["ConfigError: -n 32 must be a multiple of -bs x processes"]),
    (main_sampling_fid.main, ["-n", "16", "--image-size-eval", "0"], ["ConfigError: --image-size-eval must be a "
                                                                      "positive image side, got 0"]),
    (main_sampling_fid.main, ["-n", "20", "-bs", "4"], ["ConfigError: -n 20 must be a multiple of the number of "
                                                        "classes (16)"]),
])
def test_bad_input_is_refused_in_one_line(tmp_path, capsys, main, argv, fragments):
    output = ["--output", str(tmp_path)] if main is sample.main else ["--save-dir", str(tmp_path)]
    assert_one_line_error(run_in_process(main, [*MODELS, *argv, *output], capsys), *fragments)
    assert not glob.glob(str(tmp_path / "**" / "*.png"), recursive=True)


def test_measure_throughput_bad_key_is_one_line(capsys):
    assert_one_line_error(run_in_process(measure_throughput, ["model=tiny", "speed=9"], capsys),
                          "ConfigError: measure_throughput: unknown key 'speed'")
