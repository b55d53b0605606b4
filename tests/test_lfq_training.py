"""Open-MAGVIT2 tokenizer training through main_stage1.py, and the official checkpoint in every tool.

The loss terms are checked against the official functions' values (tests/data/lfq/scalars.json);
tiny runs on the built-in shapes check that training learns and resumes exactly; the official tiny
Lightning checkpoint serves as a fine-tuning start, in scripts/reconstruct.py and compute_rfid.py.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import compute_rfid
import main_stage1
from common.config import apply_overrides, load_config, parse_overrides, validate
from common.dist import DistEnv
from common.metrics import psnr, write_random_inception_weights
from common.runlog import read_metrics
from common.trainer import Position
from lfq.official import load_official_lfq, official_discriminator_state, read_lightning_state
from lfq.quantizer import LFQLosses
from lfq.model import LFQTokenizer
from lfq.stage1 import STAGE1_SCHEMA, LFQStage1Task, check_stage1_config
from lfq.official import read_lfq_config
from methods import load_tokenizer
from scripts import reconstruct
from tests.helpers import DATA, refused_in_process

LFQ_DATA = os.path.join(DATA, "lfq")
CKPT = os.path.join(LFQ_DATA, "small_lfq.ckpt")
OFFICIAL_YAML = os.path.join(LFQ_DATA, "small_config.yaml")
VECTORS = torch.load(os.path.join(LFQ_DATA, "tensors.pt"), weights_only=True)  # official outputs (see its README)
with open(os.path.join(LFQ_DATA, "scalars.json")) as file:
    SCALARS = json.load(file)
CONFIG = "configs/shapes/stage1/lfq.yaml"
# 16x16 shapes, 8x8 codes of 8 bits: the smallest set-up that still exercises every part of the step.
TINY = ["dataset.resolution=16", "arch.image_size=16", "dataset.num_samples=64", "arch.ddconfig.ch_mult=[1,2]",
        "arch.ddconfig.z_channels=8", "arch.embed_dim=8", "arch.n_embed=256", "experiment.batch_size=8",
        "experiment.log_every=1", "experiment.eval_batches=2", "loss.disc_start=8", "ema.decay=0.9",
        "optimizer.lr_drop_epoch=[2]"]
# The official tiny model's YAML, on shapes of its size, without LPIPS (no VGG weights here).
OFFICIAL_ON_SHAPES = ["dataset.type=shapes", "dataset.transforms.type=none", "dataset.num_samples=16",
                      "loss.perceptual_weight=0", "experiment.eval_batches=1"]


def records(run_dir, split="train"):
    return [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["split"] == split]


def official_task(*overrides: str) -> LFQStage1Task:
    """The training task of the official tiny model's YAML (LPIPS off), on CPU."""
    config = read_lfq_config(OFFICIAL_YAML)
    changes = parse_overrides(["loss.perceptual_weight=0", *overrides])
    config = validate(apply_overrides(config, changes, STAGE1_SCHEMA, OFFICIAL_YAML), STAGE1_SCHEMA, OFFICIAL_YAML)
    return LFQStage1Task(config, DistEnv(0, 1, 0, torch.device("cpu")), steps_per_epoch=3)


def write_inputs(folder) -> list[str]:
    folder.mkdir(parents=True)
    for i in range(4):
        shutil.copy(os.path.join(LFQ_DATA, f"input_{i}.png"), folder / f"{i}.png")
    return [f"{i}.png" for i in range(4)]


def official_pngs() -> np.ndarray:
    return np.stack([np.asarray(Image.open(os.path.join(LFQ_DATA, f"rec_{i}.png"))) for i in range(4)])


# ----------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, sizes, lecam, drops", [
    ("openmagvit2-lfq-256", (49_751_442, 65_376_387), 0.05, [200, 250]),
    ("openmagvit2-lfq-128", (48_422_162, 63_599_491), 0.01, [250, 300])])
def test_imagenet_configs_hold_the_official_settings(name, sizes, lecam, drops):
    path = f"configs/imagenet/stage1/{name}.yaml"
    config = load_config(path, STAGE1_SCHEMA)
    check_stage1_config(config)
    with torch.device("meta"):  # the released architecture, without allocating it
        model = LFQTokenizer.from_config(config["arch"], source=path)
    assert (sum(p.numel() for p in model.encoder.parameters()),
            sum(p.numel() for p in model.decoder.parameters())) == sizes
    assert model.vocab_size == 2 ** 18 and model.code_shape == (16, 16)
    assert config["loss"]["lecam_loss_weight"] == lecam and config["optimizer"]["lr_drop_epoch"] == drops
    assert config["experiment"]["batch_size"] * 32 == config["experiment"]["total_batch_size"] == 256


def test_losses_equal_the_official_terms():
    task = official_task()
    state = read_lightning_state(CKPT)
    task.discriminator.load_state_dict(official_discriminator_state(state, CKPT))  # raw weights, train mode
    entropy, gan = SCALARS["lfq_train_mode_on_h"], SCALARS["gan_terms"]
    aux = LFQLosses(*(torch.tensor(entropy[k]) for k in
                      ("entropy_aux_loss", "per_sample_entropy", "codebook_entropy", "commitment")))

    loss, logs = task.generator_loss(VECTORS["images"], VECTORS["rec"], aux, step=0)
    assert logs["loss_recon"] == pytest.approx(gan["l1_rec_loss_mean"], rel=1e-5)
    assert logs["loss_gen"] == pytest.approx(gan["g_loss_non_saturating"], rel=1e-5)
    # small_config.yaml: gen_loss_weight 0.15, codebook_weight 0.12, commit_weight 0.2
    expected = (gan["l1_rec_loss_mean"] + 0.15 * gan["g_loss_non_saturating"]
                + 0.12 * entropy["entropy_aux_loss"] + 0.2 * entropy["commitment"])
    assert loss.item() == pytest.approx(expected, rel=1e-5)

    loss_disc, logs = task.discriminator_loss(VECTORS["images"], VECTORS["rec"], step=0)
    assert logs["loss_disc_adv"] == pytest.approx(gan["d_loss_hinge"], rel=1e-5)
    assert task.lecam.ema_real == pytest.approx(gan["lecam_ema_real_after_1_update"], rel=1e-5)
    assert task.lecam.ema_fake == pytest.approx(gan["lecam_ema_fake_after_1_update"], rel=1e-5)
    assert logs["loss_lecam"] == pytest.approx(gan["lecam_reg"], rel=1e-5)
    assert loss_disc.item() == pytest.approx(gan["d_loss_hinge"] + 0.02 * gan["lecam_reg"], rel=1e-5)


def test_gan_terms_wait_for_disc_start_and_lr_drops_after_epochs():
    task = official_task("loss.disc_start=2", "optimizer.lr_drop_epoch=[1]", "loss.gen_loss_weight=null")
    batch = {"image": torch.rand(4, 3, 32, 32) * 2 - 1}
    initial = [p.detach().clone() for p in task.discriminator.parameters()]
    logs = [task.train_step(batch, Position(step=step)) for step in range(2)]
    assert [entry["loss_disc"] for entry in logs] == [0.0, 0.0]
    assert all(torch.equal(a, b) for a, b in zip(initial, task.discriminator.parameters()))  # zero loss, no change
    logs += [task.train_step(batch, Position(step=step)) for step in range(2, 4)]
    assert all(entry["loss_disc"] > 0 for entry in logs[2:])
    assert not all(torch.equal(a, b) for a, b in zip(initial, task.discriminator.parameters()))
    assert logs[2]["gen_weight"] > 0  # the adaptive weight, as gen_loss_weight is null
    assert [entry["lr"] for entry in logs] == pytest.approx([1.5e-3] * 3 + [1.5e-4])  # 3 steps per epoch


# ----------------------------------------------------------------------------------------------
# Training through main_stage1.py
# ----------------------------------------------------------------------------------------------

def test_tiny_training_loss_falls_and_codebook_usage_grows(tmp_path):
    # 32x32 shapes, 16 steps without and 16 with the GAN terms; evaluation on 2 fixed batches (2048 codes)
    short = ["dataset.num_samples=256", "experiment.batch_size=16", "experiment.epochs=2", "optimizer.init_lr=2e-3",
             "optimizer.lr_drop_epoch=[]", "loss.disc_start=16", "ema.decay=0.9", "experiment.eval_batches=2",
             "experiment.log_every=1"]
    main_stage1.main(["-m", CONFIG, "-r", str(tmp_path / "init"), *short, "--eval"])  # the untrained tokenizer
    with open(tmp_path / "init" / "lfq" / "eval.json") as f:
        initial = json.load(f)["val"]
    main_stage1.main(["-m", CONFIG, "-r", str(tmp_path), *short])
    run = tmp_path / "lfq"
    final = records(run, "val")[-1]
    assert len(records(run)) == 32 and records(run)[-1]["loss_disc"] > 0  # the discriminator trained in epoch 2
    assert final["loss_recon"] < 0.92 * initial["loss_recon"]
    assert final["usage"] > initial["usage"] + 0.05 and final["perplexity"] > initial["perplexity"]
    for name in ("last.pt", "epoch2_model.pt", "config.yaml", "images/epoch0002.png"):
        assert (run / name).is_file()


def test_resume_continues_exactly(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    short = [*TINY, "dataset.num_samples=32", "loss.disc_start=2", "experiment.epochs=2"]  # 4 steps per epoch
    main_stage1.main(["-m", CONFIG, "-r", str(full), *short])
    main_stage1.main(["-m", CONFIG, "-r", str(part), *short, "experiment.max_steps=5"])
    main_stage1.main(["-m", CONFIG, "-r", str(part), *short, "--resume"])
    for split in ("train", "val"):
        expected, resumed = records(full / "lfq", split), records(part / "lfq", split)
        assert [r["step"] for r in resumed] == ([1, 2, 3, 4, 5, 6, 7, 8] if split == "train" else [4, 8])
        assert resumed == expected  # losses, LeCAM terms, EMA evaluation: identical across the interruption
    checkpoint = torch.load(part / "lfq" / "last.pt", weights_only=True)
    assert {"ema", "disc_ema", "lecam", "disc_optimizer"} <= set(checkpoint)


# ----------------------------------------------------------------------------------------------
# The official checkpoint as a fine-tuning start, in reconstruct.py and in compute_rfid.py
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_ema", [True, False])
def test_official_checkpoint_starts_fine_tuning(use_ema):
    task = official_task()
    main_stage1.load_weights(task, CKPT, use_ema=use_ema)
    expected = load_official_lfq(CKPT, OFFICIAL_YAML, use_ema=use_ema).state_dict()
    for name, tensor in task.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    disc = official_discriminator_state(read_lightning_state(CKPT), CKPT, use_ema=use_ema)
    for name, tensor in task.discriminator.state_dict().items():
        assert torch.equal(tensor, disc[name]), name
    for name, tensor in task.ema.shadow.items():  # the averages restart from the loaded weights
        assert torch.equal(tensor, expected[name]), name


def test_official_yaml_and_checkpoint_train_through_main_stage1(tmp_path):
    main_stage1.main(["-m", OFFICIAL_YAML, "-r", str(tmp_path), "-l", CKPT, *OFFICIAL_ON_SHAPES,
                      "experiment.max_steps=2"])
    run = tmp_path / "small_config"
    assert [r["step"] for r in records(run)] == [1, 2]
    model, config = load_tokenizer(str(run / "last.pt"))
    assert config["loss"]["lecam_loss_weight"] == 0.02 and config["arch"]["embed_dim"] == 8
    assert model.encode_tokens(torch.zeros(1, 3, 32, 32)).shape == (1, 16, 16)


def test_reconstruct_reproduces_official_reconstructions(tmp_path):
    names = write_inputs(tmp_path / "in")
    reconstruct.main(["--ckpt", CKPT, "--config", OFFICIAL_YAML, "--input", str(tmp_path / "in"), "--output",
                      str(tmp_path / "out"), "--device", "cpu"])
    ours = np.stack([np.asarray(Image.open(tmp_path / "out" / name)) for name in names]).astype(int)
    # the official PNGs truncate to uint8, ours round: at most one level apart
    assert np.abs(ours - official_pngs().astype(int)).max() <= 1


def test_compute_rfid_scores_official_checkpoint(tmp_path):
    write_inputs(tmp_path / "imagenet" / "val" / "n01440764")  # the official YAML's dataset: ImageNet layout
    release = tmp_path / "release"
    release.mkdir()
    shutil.copy(CKPT, release / "small_lfq.ckpt")  # rfid.json is written beside the checkpoint
    weights = write_random_inception_weights(str(tmp_path / "inception.pth"))
    results = compute_rfid.main(["--vqvae", str(release / "small_lfq.ckpt"), "--config", OFFICIAL_YAML,
                                 "--data-root", str(tmp_path / "imagenet"), "--batch-size", "2",
                                 "--inception-weights", weights, "--no-lpips", "--device", "cpu",
                                 "--num-workers", "0"])
    assert results["num_images"] == 4 and results["rfid"] >= 0
    assert results["usage_d0"] == SCALARS["eval_metrics_batch4"]["codebook_utilization"]  # 211 of 256 codes
    recon = torch.from_numpy(official_pngs()).permute(0, 3, 1, 2)
    original = torch.stack([torch.from_numpy(np.array(Image.open(os.path.join(LFQ_DATA, f"input_{i}.png"))))
                            for i in range(4)]).permute(0, 3, 1, 2)
    assert results["psnr"] == pytest.approx(psnr(original, recon).mean().item(), abs=0.05)
    assert json.load(open(release / "rfid.json"))["rfid"] == pytest.approx(results["rfid"])


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

def test_bad_input_gives_one_clear_line(tmp_path, capsys):
    not_tokenizer = tmp_path / "imagenet_conditional_llama_B.yaml"
    not_tokenizer.write_text("model:\n  class_path: src.Open_MAGVIT2.models.cond_transformer_gpt.Net2NetTransformer\n")
    line = refused_in_process(capsys, main_stage1.main, ["-m", str(not_tokenizer), "-r", str(tmp_path)])
    assert "not an Open-MAGVIT2 tokenizer config" in line
    line = refused_in_process(capsys, reconstruct.main, ["--ckpt", CKPT, "--config", "configs/shapes/stage1/rqvae.yaml",
                                                         "--input", LFQ_DATA, "--output", str(tmp_path / "out")])
    assert "not an Open-MAGVIT2 / LFQ tokenizer config" in line
    line = refused_in_process(capsys, main_stage1.main, ["-m", CONFIG, "-r", str(tmp_path), "-l", CKPT])
    assert "8-bit codes" in line and "10 bits" in line
    line = refused_in_process(capsys, main_stage1.main, ["-m", CONFIG, "-r", str(tmp_path), "dataset.resolution=64"])
    assert "dataset.resolution 64" in line and "arch.image_size 32" in line
    line = refused_in_process(capsys, main_stage1.main, ["-m", CONFIG, "-r", str(tmp_path), "arch.image_size=30",
                                                         "dataset.resolution=30"])
    assert "image_size must be a multiple of 4" in line
    assert not (tmp_path / "out").exists()
