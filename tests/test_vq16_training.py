"""LlamaGen VQ tokenizer training through main_stage1.py (`arch.type: vq16`, npp/stage1.py).

The objective is checked against the official tiny VQ's training-mode quantizer losses (tests/data/npp/, see
test_npp_vq.py); tiny runs on 16 px shapes check that training learns and resumes exactly; an official
training checkpoint of vq_train.py (made here from the official tiny VQ) is a fine-tuning start.
"""
from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F

import main_stage1
from common.checkpoint import load_file, strict_load
from common.config import load_config, read_yaml, validate
from common.dist import DistEnv
from common.losses import NLayerDiscriminator
from common.runlog import read_metrics
from npp.official import read_vq_config, vq_arch_from_state
from npp.stage1 import STAGE1_SCHEMA, VQStage1Task
from tests.helpers import DATA, assert_resume_is_exact, evaluate_then_train, refused_in_process, train_records
from tests.test_npp_vq import CKPT as OFFICIAL_VQ, OUTPUTS, official_inputs

CONFIG = "configs/shapes/stage1/vq16.yaml"
IMAGENET = "configs/imagenet/stage1/llamagen-vq16.yaml"
OFFICIAL_STATE = load_file(OFFICIAL_VQ)["model"]
# 16x16 shapes -> 8x8 codes of a 64-entry codebook, a 16-wide PatchGAN
TINY = ["dataset.resolution=16", "arch.image_size=16", "dataset.num_samples=64", "arch.encoder_ch_mult=[1,2]",
        "arch.decoder_ch_mult=[1,2]", "arch.z_channels=32", "arch.codebook_size=64", "experiment.batch_size=8",
        "experiment.log_every=1", "experiment.eval_batches=2", "loss.disc_dim=16", "--device", "cpu"]
# the official tiny VQ's architecture (24 px -> 12x12 codes of 128 entries)
OFFICIAL_ARCH = {**vq_arch_from_state(OFFICIAL_STATE, OFFICIAL_VQ), "image_size": 24}
AS_OFFICIAL = [f"arch.{key}={json.dumps(value).replace(' ', '')}" for key, value in OFFICIAL_ARCH.items()
               if key != "type"] + ["dataset.resolution=24", "loss.disc_dim=16", "--device", "cpu"]


def official_task(**arch) -> VQStage1Task:
    """The training task of the shapes config with the official tiny VQ's architecture and weights, on CPU."""
    config = read_yaml(CONFIG)
    config["arch"] = {**OFFICIAL_ARCH, **arch}
    config["dataset"]["resolution"] = 24
    config["loss"]["disc_dim"] = 16
    task = VQStage1Task(validate(config, STAGE1_SCHEMA, CONFIG), DistEnv(0, 1, 0, torch.device("cpu")), 4)
    strict_load(task.model, OFFICIAL_STATE, OFFICIAL_VQ)
    return task


def test_generator_objective_adds_the_official_training_mode_losses():
    task = official_task(commit_loss_beta=0.3, entropy_loss_ratio=0.05)  # the reference's settings
    x, recon = official_inputs(), torch.from_numpy(OUTPUTS["recon"])
    quantizer = task.model.quantize.train()
    aux = quantizer(torch.from_numpy(OUTPUTS["z_e"]))[1]
    official = {name: float(OUTPUTS[name]) for name in ("vq_loss", "commit_loss", "entropy_loss", "codebook_usage")}

    before = task.objective.disc_start - 2  # 0-based: LlamaGen's global_step disc_start - 1, no GAN terms yet
    loss, logs = task.generator_loss(x, recon, aux, step=before)
    assert {name: logs[name] for name in official} == pytest.approx(official, rel=1e-4)
    quantizer_terms = official["vq_loss"] + official["commit_loss"] + official["entropy_loss"]
    assert loss.item() == pytest.approx(F.mse_loss(recon, x).item() + quantizer_terms, rel=1e-5)
    assert task.discriminator_loss(x, recon, step=before)[0].item() == 0.0

    on = task.objective.disc_start - 1  # LlamaGen's global_step == disc_start: both GAN terms at disc_weight 0.5
    loss, logs = task.generator_loss(x, recon, aux, step=on)
    fake, real = task.discriminator(recon), task.discriminator(x)
    assert logs["gen_weight"] == 0.5 and logs["loss_gen"] == pytest.approx(-fake.mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(F.mse_loss(recon, x).item() + quantizer_terms - 0.5 * fake.mean().item(),
                                        rel=1e-5)
    hinge = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    assert task.discriminator_loss(x, recon, step=on)[0].item() == pytest.approx(0.5 * hinge.item(), rel=1e-5)


def test_imagenet_config_holds_the_official_recipe():
    config = load_config(IMAGENET, STAGE1_SCHEMA)
    optimizer, loss, experiment = config["optimizer"], config["loss"], config["experiment"]
    assert (optimizer["type"], optimizer["init_lr"], optimizer["betas"], optimizer["max_gn"]) == \
        ("adam", 1e-4, [0.9, 0.95], 1.0)
    assert optimizer["warmup"]["decay"] == "constant" and optimizer["weight_decay"] == 0.0
    assert (loss["disc_start"], loss["disc_weight"], loss["perceptual_weight"], loss["reconstruction_loss"],
            loss["disc_adaptive_weight"], loss["disc_dim"], loss["disc_num_layers"]) == \
        (20000, 0.5, 1.0, "l2", False, 64, 3)
    assert experiment["batch_size"] * 8 == 128 and experiment["epochs"] == 40 and not config["ema"]["use_ema"]
    assert config["dataset"]["transforms"]["type"] == "random_crop"
    assert read_vq_config(IMAGENET)["arch"]["codebook_size"] == 16384  # still a tokenizer config for --config


def test_tiny_training_reconstruction_falls_and_codebook_usage_is_logged(tmp_path):
    short = [*TINY, "dataset.num_samples=96", "experiment.epochs=1", "optimizer.init_lr=1e-3", "loss.disc_start=12"]
    initial = evaluate_then_train(main_stage1.main, ["-m", CONFIG, *short], tmp_path, "vq16")
    run = tmp_path / "vq16"
    records = train_records(run)
    assert len(records) == 12 and all(0 < r["codebook_usage"] <= 1 for r in records)
    assert records[10]["loss_disc"] == 0.0 and records[11]["loss_disc"] > 0  # the GAN terms from step 12 on
    final = [r for r in read_metrics(str(run / "metrics.jsonl")) if r["split"] == "val"][-1]
    assert final["loss_recon"] < 0.8 * initial["loss_recon"] and 0 < final["usage"] <= 1
    assert (run / "last.pt").is_file() and (run / "images" / "epoch0001.png").is_file()


def test_resume_continues_exactly(tmp_path):
    # stops between disc_start and the end, with the EMA and the usage window to carry over
    assert_resume_is_exact(main_stage1.main, ["-m", CONFIG, *TINY, "dataset.num_samples=16", "experiment.epochs=2",
                                              "experiment.eval_batches=1", "loss.disc_start=2", "ema.use_ema=true",
                                              "ema.decay=0.9"],
                           tmp_path, "vq16", stop_step=3, total_steps=4)


def test_official_training_checkpoint_starts_fine_tuning(tmp_path):
    torch.manual_seed(0)
    discriminator = NLayerDiscriminator(3, 16, 2).state_dict()
    ema = {name: tensor if name == "quantize.codebook_used" else tensor + 0.01
           for name, tensor in OFFICIAL_STATE.items()}
    path = tmp_path / "0000040.pt"  # as vq_train.py --ema writes it
    torch.save({"model": OFFICIAL_STATE, "ema": ema, "optimizer": {"state": {}, "param_groups": []},
                "discriminator": discriminator, "optimizer_disc": {"state": {}, "param_groups": []}, "steps": 40,
                "args": argparse.Namespace(vq_model="VQ-16", ema=True, image_size=256)}, path)
    main_stage1.main(["-m", CONFIG, "-r", str(tmp_path), "-l", str(path), *AS_OFFICIAL, "dataset.num_samples=8",
                      "experiment.batch_size=8", "experiment.max_steps=1", "experiment.eval_batches=1",
                      "optimizer.init_lr=0"])
    trained = torch.load(tmp_path / "vq16" / "last.pt", weights_only=True)
    for name, tensor in ema.items():  # the EMA weights by default; at learning rate 0 they stay
        if name != "quantize.codebook_used":  # the usage window moved with the step
            assert torch.equal(trained["model"][name], tensor), name
    for name, tensor in discriminator.items():
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(trained["discriminator"][name], tensor), name

    task = official_task()
    main_stage1.load_weights(task, str(path), use_ema=False)  # --load-raw
    assert all(torch.equal(task.model.state_dict()[name], OFFICIAL_STATE[name]) for name in OFFICIAL_STATE)


def test_bad_input_gives_one_clear_line(tmp_path, capsys):
    line = refused_in_process(capsys, main_stage1.main, ["-m", CONFIG, "-r", str(tmp_path), *TINY,
                                                         "-l", f"{DATA}/lfq/small_lfq.ckpt"])
    assert "small_lfq.ckpt: an Open-MAGVIT2 tokenizer, and the config trains a VQTokenizer" in line
    line = refused_in_process(capsys, main_stage1.main, ["-m", "configs/shapes/stage1/lfq.yaml", "-r", str(tmp_path),
                                                         "-l", OFFICIAL_VQ, "--device", "cpu"])
    assert "vq_tiny.pt: a LlamaGen VQ tokenizer, and the config trains a LFQTokenizer" in line
    line = refused_in_process(capsys, main_stage1.main, ["-m", CONFIG, "-r", str(tmp_path), "dataset.resolution=24"])
    assert "dataset.resolution 24 differs from arch.image_size 32" in line
