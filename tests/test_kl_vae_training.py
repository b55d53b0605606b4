"""KL-VAE training on the shared GAN tokenizer task: the loss falls on a tiny run, resume is exact."""
from __future__ import annotations

import json
import os

import torch

import main_stage1
from common.config import apply_overrides, parse_overrides, read_yaml, validate
from common.dist import DistEnv
from common.runlog import read_metrics
from mar.stage1 import STAGE1_SCHEMA, KLVAEStage1Task
from tests.helpers import assert_resume_is_exact, train_records

CONFIG = "configs/shapes/stage1/kl-vae.yaml"
# 16x16 shapes, one downsampling to 8x8 latents: the smallest KL-VAE that still exercises every part of the step.
TINY = ["dataset.resolution=16", "arch.resolution=16", "arch.ch_mult=[1,2]", "dataset.num_samples=64",
        "experiment.batch_size=8", "experiment.log_every=1", "experiment.eval_batches=2", "loss.disc_start=8"]


def val_records(run_dir) -> list[dict]:
    return [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["split"] == "val"]


def test_tiny_training_loss_falls(tmp_path):
    # 24 steps, the last 16 with the GAN terms; evaluation decodes the posterior mean of 2 fixed batches
    short = [*TINY, "experiment.epochs=3", "optimizer.init_lr=2e-3"]
    main_stage1.main(["-m", CONFIG, "-r", str(tmp_path / "init"), *short, "--eval"])  # the untrained VAE
    with open(tmp_path / "init" / "kl-vae" / "eval.json") as f:
        initial = json.load(f)["val"]
    main_stage1.main(["-m", CONFIG, "-r", str(tmp_path), *short])
    run = tmp_path / "kl-vae"
    records = train_records(run)
    assert len(records) == 24
    assert all(r["loss_disc"] == 0.0 for r in records[:8]) and all(r["loss_disc"] > 0 for r in records[8:])
    assert records[-1]["gen_weight"] > 0 and records[-1]["loss_kl"] > 0  # the adaptive weight; a KL term
    assert val_records(run)[-1]["loss_recon"] < 0.92 * initial["loss_recon"]
    for name in ("last.pt", "epoch3_model.pt", "config.yaml", "images/epoch0003.png"):
        assert (run / name).is_file()


def test_resume_continues_exactly(tmp_path):
    # The posterior samples draw from the global RNG, which the checkpoint carries.
    assert_resume_is_exact(main_stage1.main, ["-m", CONFIG, *TINY, "experiment.epochs=2"], tmp_path, "kl-vae", stop_step=11,
                           total_steps=16)
    assert val_records(tmp_path / "full" / "kl-vae") == val_records(tmp_path / "part" / "kl-vae")


def test_kl_term_is_weighted_mean_of_per_sample_kl():
    changes = parse_overrides([*TINY, "loss.kl_weight=0.5"])
    config = validate(apply_overrides(read_yaml(CONFIG), changes, STAGE1_SCHEMA, CONFIG), STAGE1_SCHEMA, CONFIG)
    task = KLVAEStage1Task(config, DistEnv(0, 1, 0, torch.device("cpu")), steps_per_epoch=8)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    recon, posterior = task.model(x)
    loss, logs = task.generator_loss(x, recon, posterior, step=0)  # before disc_start: no GAN term
    expected = (recon - x).abs().mean() + 0.5 * posterior.kl().mean()
    assert torch.allclose(loss, expected) and logs["loss_kl"] == posterior.kl().mean().item()
