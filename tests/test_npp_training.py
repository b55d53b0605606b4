"""Next-patch prediction through main_stage2.py, on shapes images encoded by the official tiny LlamaGen VQ.

24 px images -> 12x12 codes of 128 entries; three stages (4x4 patches, 2x2 patches, tokens).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import main_stage2
from common.checkpoint import load_file
from common.runlog import read_metrics
from npp.schedule import patch_plan, segment_lr_multiplier
from scripts import sample
from tests.helpers import (DATA, assert_one_line_error, assert_resume_is_exact, refused_in_process, run_cli,
                           train_records)

CONFIG = "configs/shapes/stage2/npp-gpt.yaml"
VQ = os.path.join(DATA, "npp", "vq_tiny.pt")
GPT_FILE = os.path.join(DATA, "npp", "gpt_tiny_c2i.pt")
RQVAE = os.path.join(DATA, "rqvae", "stage1", "model.pt")
UNITS = dict(np.load(os.path.join(DATA, "npp", "units.npz")))
TINY = ["-v", VQ, "dataset.resolution=24", "dataset.num_samples=64", "arch.dim=32", "arch.n_layer=2",
        "arch.n_head=2", "experiment.batch_size=8", "experiment.log_every=1", "experiment.eval_batches=2",
        "experiment.sample.top_k=8", "npp.warmup_epochs=0.25"]


def test_patch_plans_and_lr_schedule_match_the_official_ones():
    with open(os.path.join(DATA, "npp", "epoch_plans.json")) as f:
        plans = json.load(f)  # the official plans for 200 epochs
    for key, plan in plans.items():
        epochs, level, rate = key.split("_")
        assert patch_plan(int(epochs[1:]), int(level[1:]), float(rate[1:])) == \
            (plan["patch_sizes"], plan["epoch_range"])
    plan = patch_plan(12, 4, 0.6)
    ours = [3e-4 * segment_lr_multiplier(step, 5, plan, 1, 0.3, 3e-4, 3e-5) for step in range(60)]
    assert ours == pytest.approx(UNITS["lr_schedule_E12_spe5_K4_r0.6"][:60].tolist(), rel=1e-12, abs=1e-15)


def test_tiny_training_goes_from_patches_to_tokens_and_learns(tmp_path):
    main_stage2.main(["-m", CONFIG, "-r", str(tmp_path), *TINY, "experiment.epochs=4", "optimizer.init_lr=3e-3"])
    run = tmp_path / "npp-gpt"
    records = train_records(run)
    assert [r["patch_size"] for r in records] == [16] * 8 + [4] * 8 + [1] * 16  # stages end at epochs 1, 2, 4
    assert records[0]["lr"] == 0.0 and records[8]["lr"] == 0.0  # every stage restarts its warm-up at zero
    val = [r["val_loss"] for r in read_metrics(str(run / "metrics.jsonl")) if r["split"] == "val"]
    assert len(val) == 4 and val == sorted(val, reverse=True) and val[-1] < val[0] - 0.3  # token-level loss falls
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["config"]["arch"]["vocab_size"] == 128 and ckpt["config"]["arch"]["image_tokens"] == 144
    decay_groups = [group["weight_decay"] for group in ckpt["optimizer"]["param_groups"]]
    assert decay_groups == [0.05, 0.0]  # no decay on the RMSNorm weights, as officially
    assert (run / "images" / "epoch0004.png").is_file()


def test_resume_continues_exactly(tmp_path):
    # stops inside the 2x2-patch stage; class dropout and the patch schedule continue exactly
    assert_resume_is_exact(main_stage2.main, ["-m", CONFIG, *TINY, "experiment.epochs=2"], tmp_path, "npp-gpt",
                           stop_step=11, total_steps=16)


def test_official_gpt_file_as_starting_point(tmp_path, capsys):
    # -l loads the official weights; at learning rate 0 the run's checkpoint still holds exactly them
    main_stage2.main(["-m", CONFIG, "-r", str(tmp_path), "-v", VQ, "-l", GPT_FILE, "dataset.resolution=24",
                      "dataset.num_samples=16", "arch.dim=48", "arch.n_layer=3", "arch.n_head=4",
                      "arch.multiple_of=48", "arch.num_classes=12", "experiment.batch_size=8", "experiment.epochs=1",
                      "experiment.eval_batches=1", "optimizer.init_lr=0.0", "npp.scheduler=false"])
    checkpoint = str(tmp_path / "npp-gpt" / "last.pt")
    trained, official = torch.load(checkpoint, weights_only=True)["model"], load_file(GPT_FILE)["model"]
    assert trained.keys() == official.keys() and all(torch.equal(trained[k], official[k]) for k in official)

    # scripts/sample.py on that checkpoint draws the official sampler's greedy guided codes and images
    sample.main(["-v", VQ, "-a", checkpoint, "--classes", "0", "7", "--top-k", "1", "--cfg", "1.5", "--device", "cpu",
                 "--output", str(tmp_path / "out")])
    codes = np.load(tmp_path / "out" / "codes.npy")
    official_codes = np.load(os.path.join(DATA, "npp", "gpt_generate.npz"))["codes_greedy_cfg1.5"]
    assert codes.shape == (2, 12, 12) and np.array_equal(codes.reshape(2, 144), official_codes)
    for index, label in enumerate((0, 7)):  # ours round, LlamaGen truncates: at most one level apart
        ours = np.asarray(Image.open(tmp_path / "out" / f"{index:05d}.png")).astype(int)
        reference = np.asarray(Image.open(os.path.join(DATA, "npp", f"sample_greedy_cfg1.5_label{label}.png")))
        assert np.abs(ours - reference.astype(int)).max() <= 1
    capsys.readouterr()  # the progress bar of the run above
    line = refused_in_process(capsys, sample.main, ["-v", RQVAE, "-a", checkpoint, "--output", str(tmp_path / "x")])
    assert "pass the tokenizer it was trained with" in line


def test_official_open_magvit2_tokenizer_with_its_yaml(tmp_path, capsys):
    lfq = [os.path.join(DATA, "lfq", "small_lfq.ckpt"), "dataset.resolution=32", "dataset.num_samples=16",
           "arch.dim=32", "arch.n_layer=1", "arch.n_head=2", "experiment.batch_size=8", "experiment.epochs=1",
           "experiment.eval_batches=1", "experiment.tensorboard=false"]
    line = refused_in_process(capsys, main_stage2.main, ["-m", CONFIG, "-r", str(tmp_path), "-v", *lfq])
    assert "small_lfq.ckpt" in line and "--config" in line
    assert not os.listdir(tmp_path)
    main_stage2.main(["-m", CONFIG, "-r", str(tmp_path), "-v", *lfq, "--config",
                      os.path.join(DATA, "lfq", "small_config.yaml")])
    assert train_records(tmp_path / "npp-gpt")


def refused(capsys, *argv: str) -> str:
    """The one line main_stage2.py refuses `-m CONFIG argv` with, run in this process."""
    return refused_in_process(capsys, main_stage2.main, ["-m", CONFIG, *argv])


def test_bad_input_gives_one_clear_line(tmp_path, capsys):
    # the process itself, once: nothing but the line on stderr
    assert_one_line_error(run_cli("main_stage2.py", "-m", CONFIG, "-r", str(tmp_path), "-v", RQVAE),
                          "square grid of codes", "[8, 8, 3]")
    run = ["-r", str(tmp_path), *TINY]
    assert "npp.patch_level 5" in refused(capsys, *run, "npp.patch_level=5")
    assert "do not tile the 12x12 code grid" in refused(capsys, *run, "npp.patch_level=4")
    line = refused(capsys, *run, "arch.vocab_size=64")
    assert "arch.vocab_size 64" in line and "128" in line
    assert "not a GPT checkpoint" in refused(capsys, *run, "-l", RQVAE)
