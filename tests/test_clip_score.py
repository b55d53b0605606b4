"""CLIP score (compute_metrics.py --metrics clip) against a direct open_clip computation.

The weights are random, saved by the tests in open_clip's layout of the OpenAI model, for a tiny CLIP of
the ViT-B/32 family registered with open_clip (same code path as ViT-B/32, a fraction of the cost).
"""
import importlib
import json
import os
import sys

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import compute_metrics
from common.captions import sample_file_name, write_captions_file
from common.errors import ConfigError, DataError, WeightsError
from common.metrics.clip_score import CLIP_FILE, CLIP_URL, ClipScorer, find_clip_weights, pair_captions
from common.metrics.images import open_images
from tests.helpers import refused_in_process

TINY = "tiny-test-clip-quickgelu"
TINY_CONFIG = {"embed_dim": 16, "quick_gelu": True,
               "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "patch_size": 32, "head_width": 16},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
CAPTIONS = ["a red star on a blue background, top left", "a green circle", "two cats on a sofa"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model registered with open_clip, its random weights as safetensors and as a torch state dict."""
    root = tmp_path_factory.mktemp("clip")
    (root / f"{TINY}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(str(root / f"{TINY}.json"))
    torch.manual_seed(0)
    model = open_clip.create_model(TINY, pretrained=None).eval()
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(root / "tiny.safetensors"))
    torch.save(state, root / "tiny.pt")
    return {"model": model, "safetensors": str(root / "tiny.safetensors"), "pt": str(root / "tiny.pt")}


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """Three samples named by caption index, their captions file, a grid that has no caption, and an .npz."""
    folder = tmp_path_factory.mktemp("samples")
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / sample_file_name(index))
    Image.fromarray(images[0]).save(folder / "grid.png")
    write_captions_file(str(folder / "captions.jsonl"), CAPTIONS)
    np.savez(folder.parent / "samples.npz", arr_0=images)
    return {"folder": str(folder), "images": images, "captions": str(folder / "captions.jsonl"),
            "npz": str(folder.parent / "samples.npz")}


@pytest.fixture(scope="module")
def expected(tiny, samples) -> float:
    """The official computation, written directly with open_clip: preprocess, encode, cosine, mean."""
    _, _, preprocess = open_clip.create_model_and_transforms(TINY, pretrained=None)
    pixels = torch.stack([preprocess(Image.fromarray(image)) for image in samples["images"]])
    tokens = open_clip.get_tokenizer(TINY)(CAPTIONS)
    with torch.no_grad():
        scores = F.cosine_similarity(tiny["model"].encode_image(pixels), tiny["model"].encode_text(tokens))
    return float(scores.mean())


def clip_metrics(weights, fake, captions, *extra):
    return compute_metrics.main(["--fake", fake, "--metrics", "clip", "--captions", captions, "--clip-weights",
                                 weights, "--clip-model", TINY, "--device", "cpu", "--num-workers", "0", *extra])


@pytest.mark.parametrize("layout", ["safetensors", "pt"])
def test_clip_score_equals_a_direct_open_clip_computation(tiny, samples, expected, layout, capsys):
    results = clip_metrics(tiny[layout], samples["folder"], samples["captions"], "--batch-size", "2")
    assert results["clip_score"] == pytest.approx(expected, abs=1e-5) and results["clip_images"] == 3
    with open(os.path.join(samples["folder"], "metrics.json")) as handle:
        assert json.load(handle)["clip_score"] == pytest.approx(expected, abs=1e-5)
    output = capsys.readouterr().out
    assert "CLIP score" in output and "1 images in" in output  # grid.png has no caption


def test_captions_alone_pair_by_index_and_npz_rows_by_position(tiny, samples, expected, tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(CAPTIONS) + "\n")
    by_index = clip_metrics(tiny["pt"], samples["folder"], str(tmp_path / "prompts.txt"))
    by_row = clip_metrics(tiny["pt"], samples["npz"], samples["captions"])
    assert by_index["clip_score"] == pytest.approx(expected, abs=1e-5)
    assert by_row["clip_score"] == pytest.approx(expected, abs=1e-5)
    (tmp_path / "shuffled.txt").write_text("\n".join(CAPTIONS[::-1]) + "\n")
    shuffled = clip_metrics(tiny["pt"], samples["folder"], str(tmp_path / "shuffled.txt"))
    assert shuffled["clip_score"] != pytest.approx(expected, abs=1e-4)  # the pairing is what is scored


class PooledPixels(torch.nn.Module):
    """A stand-in for Inception with its output layout (features, logits): 4x4-pooled pixels."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # the accumulator reads the device from a parameter

    def forward(self, images):
        pooled = F.adaptive_avg_pool2d(images.float(), 4).flatten(1)
        return pooled, pooled


def test_fid_and_clip_score_in_one_run(tiny, samples, expected, tmp_path, monkeypatch):
    monkeypatch.setattr(compute_metrics, "load_inception", lambda path, device: PooledPixels())
    (tmp_path / "inception.pth").write_bytes(b"")
    results = clip_metrics(tiny["pt"], samples["folder"], samples["captions"], "--metrics", "fid,clip",
                           "--ref", samples["folder"], "--inception-weights", str(tmp_path / "inception.pth"))
    assert results["fid"] == pytest.approx(0, abs=1e-3) and results["num_images"] == 4  # FID counts grid.png
    assert results["clip_score"] == pytest.approx(expected, abs=1e-5) and results["clip_images"] == 3


def test_bad_clip_inputs_are_refused_with_one_line(tiny, samples, tmp_path, capsys, monkeypatch):
    (tmp_path / "more.txt").write_text("\n".join(CAPTIONS + ["a fourth caption"]) + "\n")
    line = refused_in_process(capsys, compute_metrics.main, [
        "--fake", samples["folder"], "--metrics", "clip", "--captions", str(tmp_path / "more.txt"),
        "--clip-weights", tiny["pt"], "--clip-model", TINY])
    assert "more.txt: caption 3 has no image" in line and "00003.png (1 of 4 captions" in line
    line = refused_in_process(capsys, compute_metrics.main, ["--fake", samples["folder"], "--metrics", "clip"])
    assert "pass --captions FILE" in line
    with pytest.raises(ConfigError, match="--captions is read by --metrics clip only"):
        compute_metrics.parse_args(["--fake", samples["folder"], "--ref", samples["folder"], "--captions", "c.txt"])
    with pytest.raises(DataError, match="holds 3 images and .* 4 captions"):
        pair_captions(samples["npz"], open_images(samples["npz"]), str(tmp_path / "more.txt"))
    torch.save({"visual.conv1.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match=f"not the weights of open_clip's {TINY} \\(missing keys"):
        ClipScorer(str(tmp_path / "other.pt"), TINY)
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "ViT-B-32.pt"))
    with pytest.raises(WeightsError, match="TorchScript archive"):
        ClipScorer(str(tmp_path / "ViT-B-32.pt"), TINY)
    with pytest.raises(WeightsError, match="does not exist"):
        find_clip_weights(str(tmp_path / "missing.safetensors"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(WeightsError) as error:
        find_clip_weights(None)
    assert CLIP_FILE in str(error.value) and CLIP_URL in str(error.value) and "--clip-weights" in str(error.value)


def test_open_clip_is_imported_only_when_clip_is_scored():
    """Reloading the modules with open_clip unloaded: their own imports must not bring it back."""
    unloaded = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "open_clip"}
    try:
        for name in unloaded:
            del sys.modules[name]
        importlib.reload(importlib.import_module("common.metrics.clip_score"))
        importlib.reload(compute_metrics)
        assert "open_clip" not in sys.modules
    finally:
        sys.modules.update(unloaded)
