"""The built-in shapes evaluator: its classifier, its scores, its cache, and compute_metrics.py --metrics shapes.

The classifier is trained once per module with the real recipe, into a temporary cache folder: about 35 s of
one CPU core (its held-out accuracy is the number the recipe promises, so a shorter recipe would not test it).
"""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import compute_metrics
from common.checkpoint import save_checkpoint
from common.errors import CheckpointError
from common.metrics import ShapesEvaluator, shapes
from common.metrics.shapes import CLASS_NAMES, label_from_name
from common.metrics.shapes_classifier import (CLASSIFIER_FILE, ClassifierRecipe, draw_shapes, read_classifier_file,
                                              train_classifier)
from common.paths import CACHE_ENV
from tests.helpers import refused_in_process

SCORES = ("shapes_accuracy", "shapes_fd", "shapes_precision", "shapes_recall")


@pytest.fixture(scope="module")
def cache_dir():
    return os.environ[CACHE_ENV]  # the session's (conftest.py): the quickstart tests may have trained it already


@pytest.fixture(scope="module")
def evaluator(cache_dir):
    return ShapesEvaluator.load_or_train(cache_dir)


@pytest.fixture(scope="module")
def unseen_shapes():
    """200 real shapes the classifier has not seen: the val split drawn with another seed. uint8, labels."""
    return draw_shapes("val", 200, seed=1)


def noise_like(images: torch.Tensor) -> torch.Tensor:
    return torch.rand(images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_classifier_recognises_held_out_shapes(evaluator):
    assert evaluator.val_accuracy >= 0.95  # measured: 0.980 on the 1,000 shapes val images
    assert read_classifier_file(evaluator.path)["val_accuracy"] == evaluator.val_accuracy


def test_real_shapes_score_far_better_than_noise_and_shuffled_labels(evaluator, unseen_shapes):
    images, labels = unseen_shapes
    real = evaluator.score(images, labels)
    shuffled = evaluator.score(images, labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))])
    noise = evaluator.score(noise_like(images), labels)
    assert real["shapes_accuracy"] >= 0.9  # measured: 0.95
    assert shuffled["shapes_accuracy"] < 0.3 and noise["shapes_accuracy"] < 0.3
    assert shuffled["shapes_fd"] == real["shapes_fd"]  # the labels only enter the accuracy
    assert 100 * real["shapes_fd"] < noise["shapes_fd"]  # measured: about 1.0 against 440
    assert real["shapes_precision"] > 0.8 and real["shapes_recall"] > 0.8  # measured: 0.93 and 0.90
    assert noise["shapes_precision"] < 0.1 and noise["shapes_recall"] < 0.1


def test_float_images_score_as_their_uint8_pixels(evaluator, unseen_shapes):
    images, labels = unseen_shapes
    as_float = images.float() / 127.5 - 1 + 1e-3  # less than half a grey level off: rounds back to the same pixels
    assert evaluator.score(as_float, labels) == evaluator.score(images, labels)


def test_soft_outlines_keep_their_class(evaluator, unseen_shapes):
    """Shapes shrunk to 16 px and enlarged back, as blurred as a tokenizer trained for minutes draws them, are
    still recognised (a classifier trained on crisp shapes only recognised 26% of them)."""
    images, labels = unseen_shapes
    small = F.interpolate(images.float() / 127.5 - 1, size=(16, 16), mode="bilinear", antialias=True)
    soft = F.interpolate(small, size=(32, 32), mode="bilinear")
    assert evaluator.score(soft, labels)["shapes_accuracy"] >= 0.85  # measured: 0.92 (0.95 on the val split)


def test_reconstruction_fd_grows_with_the_damage(evaluator, unseen_shapes):
    originals = unseen_shapes[0].float() / 127.5 - 1
    blurred = F.avg_pool2d(originals, 3, stride=1, padding=1, count_include_pad=False)
    rfd = {name: evaluator.score_reconstructions(images, originals)["shapes_rfd"]
           for name, images in (("same", originals), ("blurred", blurred), ("noise", noise_like(originals)))}
    assert abs(rfd["same"]) < 1e-3 * rfd["blurred"]
    assert rfd["blurred"] < rfd["noise"] / 5


def test_reconstruction_accuracy_is_the_class_kept_by_the_reconstructions(evaluator, unseen_shapes):
    originals, labels = unseen_shapes[0].float() / 127.5 - 1, unseen_shapes[1]
    same = evaluator.score_reconstructions(originals, originals, labels)["shapes_recon_accuracy"]
    noise = evaluator.score_reconstructions(noise_like(originals), originals, labels)["shapes_recon_accuracy"]
    assert same >= 0.9 and noise < 0.3  # measured: 0.95 and 0.10


def test_retraining_gives_identical_weights():
    short = ClassifierRecipe(train_images=256, epochs=1)  # the code path of the real recipe, in a second
    rng_before = torch.get_rng_state()
    first, second, other_seed = train_classifier(short), train_classifier(short), train_classifier(
        ClassifierRecipe(train_images=256, epochs=1, seed=1))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's random stream is left alone
    assert all(torch.equal(first["model"][key], second["model"][key]) for key in first["model"])
    assert torch.equal(first["val_features"], second["val_features"])
    assert not torch.equal(first["model"]["head.weight"], other_seed["model"]["head.weight"])


def test_the_cached_classifier_is_reloaded_from_ARGEN_CACHE(evaluator, cache_dir, monkeypatch):
    monkeypatch.setattr(shapes, "train_classifier", lambda: pytest.fail("retrained a cached classifier"))
    monkeypatch.setenv(CACHE_ENV, cache_dir)
    again = ShapesEvaluator.load_or_train()
    assert again.path == evaluator.path
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(),
                                                 evaluator.model.state_dict().values()))


def test_a_classifier_of_another_recipe_is_retrained(evaluator, tmp_path, monkeypatch):
    current = read_classifier_file(evaluator.path)
    save_checkpoint(str(tmp_path / CLASSIFIER_FILE), {**current, "recipe": {**current["recipe"], "epochs": 1}})
    calls = []
    monkeypatch.setattr(shapes, "train_classifier", lambda: calls.append(1) or current)
    ShapesEvaluator.load_or_train(str(tmp_path))
    ShapesEvaluator.load_or_train(str(tmp_path))
    assert calls == [1]


def test_an_unwritable_cache_is_one_clear_error(evaluator, tmp_path, monkeypatch):
    monkeypatch.setattr(shapes, "train_classifier", lambda: read_classifier_file(evaluator.path))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(CheckpointError, match="cannot write the shapes classifier.*ARGEN_CACHE"):
        ShapesEvaluator.load_or_train(str(tmp_path / "a_file"))


@pytest.mark.parametrize("name, label", [
    ("star_00012.png", 3), ("star/00012.png", 3), ("7/00012.png", 7), ("Heart-2.png", 8),
    ("00012.png", None), ("samples/00012.png", None), ("circles_1.png", None),
])
def test_labels_come_from_class_names_in_file_names(name, label):
    assert label_from_name(name) == label


# ---------------------------------------------------------------------------------------------
# compute_metrics.py --metrics shapes
# ---------------------------------------------------------------------------------------------

def run_shapes(fake: str, cache_dir: str, *extra: str) -> dict:
    return compute_metrics.main(["--fake", fake, "--metrics", "shapes", "--cache-dir", cache_dir, "--device", "cpu",
                                 "--num-workers", "0", *extra])


def refused(capsys, argv) -> str:
    return refused_in_process(capsys, compute_metrics.main, argv)


def write_shapes(folder, images: torch.Tensor, labels: torch.Tensor | None) -> str:
    os.makedirs(folder, exist_ok=True)
    for index, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        prefix = f"{CLASS_NAMES[labels[index]]}_" if labels is not None else ""
        Image.fromarray(image).save(os.path.join(folder, f"{prefix}{index:05d}.png"))
    return str(folder)


def test_compute_metrics_scores_a_labelled_folder(evaluator, cache_dir, unseen_shapes, tmp_path, capsys):
    images, labels = unseen_shapes[0][:40], unseen_shapes[1][:40]
    folder = write_shapes(tmp_path / "samples", images, labels)
    results = run_shapes(folder, cache_dir)
    order = np.argsort([f"{CLASS_NAMES[label]}_{index:05d}.png" for index, label in enumerate(labels)])  # file order
    expected = evaluator.score(images[order], labels[order])
    assert {key: results[key] for key in SCORES} == pytest.approx(expected, rel=1e-6)
    assert results["labels"] == "file names" and results["num_images"] == 40
    with open(os.path.join(folder, "metrics.json")) as handle:
        assert json.load(handle)["shapes_fd"] == results["shapes_fd"]
    table = capsys.readouterr().out
    assert "shapes accuracy" in table and "shapes FD" in table and "not FID" in table


def test_compute_metrics_reads_labels_from_an_npz(evaluator, cache_dir, unseen_shapes, tmp_path):
    images, labels = unseen_shapes[0][:40], unseen_shapes[1][:40]
    pixels = images.permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "labelled.npz", arr_0=pixels, labels=labels.numpy())
    np.savez(tmp_path / "unlabelled.npz", arr_0=pixels)
    labelled = run_shapes(str(tmp_path / "labelled.npz"), cache_dir)
    unlabelled = run_shapes(str(tmp_path / "unlabelled.npz"), cache_dir)
    assert labelled["shapes_accuracy"] == pytest.approx(evaluator.score(images, labels)["shapes_accuracy"])
    assert "shapes_accuracy" not in unlabelled and unlabelled["shapes_fd"] == pytest.approx(labelled["shapes_fd"])
    assert os.path.isfile(tmp_path / "labelled.metrics.json")


def test_shapes_command_lines_are_refused(cache_dir, unseen_shapes, tmp_path, capsys):
    images, labels = unseen_shapes[0][:8], unseen_shapes[1][:8]
    folder = write_shapes(tmp_path / "samples", images, labels)
    assert "drop --ref" in refused(capsys, ["--fake", folder, "--metrics", "shapes", "--ref", folder])
    assert "drop --ref" in refused(capsys, ["--fake", folder, "--metrics", "fid,shapes", "--ref", folder])
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "samples" / "zz_unnamed.png")
    assert "zz_unnamed.png: no class in its name" in refused(capsys, ["--fake", folder, "--metrics", "shapes",
                                                                       "--cache-dir", cache_dir])
    large = tmp_path / "large"
    large.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(large / "star_0.png")
    assert "32x32 images, got 64x64" in refused(capsys, ["--fake", str(large), "--metrics", "shapes"])
