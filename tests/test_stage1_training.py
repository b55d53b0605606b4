"""Stage-1 training through main_stage1.py: loss falls, resume is exact, DDP matches one process, errors are clear."""

import pytest

import main_stage1
from tests.helpers import assert_one_line_error, assert_resume_is_exact, refused_in_process, run_cli, train_records

CONFIG = "configs/shapes/stage1/rqvae.yaml"
# 16x16 shapes, one downsampling: the smallest RQ-VAE that still exercises every part of the step.
TINY = ["dataset.resolution=16", "dataset.num_samples=64", "arch.ddconfig.resolution=16",
        "arch.ddconfig.ch_mult=[1,2]", "arch.hparams.latent_shape=[8,8,32]", "arch.hparams.n_embed=32",
        "experiment.batch_size=8", "experiment.log_every=1", "experiment.eval_batches=2",
        "gan.loss.disc_start=1", "experiment.num_workers=0"]
# One process at the global batch 8, and two processes of 4 each (tests/two_process_runs.py). GAN and code restarts
# off: BatchNorm batch statistics and the restart's random pick depend on each process's share of the batch,
# everything else is averaged exactly.
DDP_RUN = ["-m", CONFIG, *TINY, "experiment.epochs=1", "gan.loss.disc_start=5",
           "arch.hparams.restart_unused_codes=false", "--device", "cpu"]


def test_tiny_training_loss_falls(tmp_path):
    main_stage1.main(["-m", CONFIG, "-r", str(tmp_path), *TINY, "experiment.epochs=3", "optimizer.init_lr=2e-3"])
    records = train_records(tmp_path / "rqvae")
    assert len(records) == 24
    first = sum(r["loss_recon"] for r in records[:4]) / 4
    last = sum(r["loss_recon"] for r in records[-4:]) / 4
    assert last < 0.7 * first
    assert "loss_disc" in records[-1]  # the GAN switched on at epoch 1
    for name in ("last.pt", "epoch3_model.pt", "config.yaml", "images/epoch0003.png"):
        assert (tmp_path / "rqvae" / name).is_file()


def test_resume_continues_exactly(tmp_path):
    assert_resume_is_exact(main_stage1.main, ["-m", CONFIG, *TINY, "experiment.epochs=2"], tmp_path, "rqvae", stop_step=11,
                           total_steps=16)


def test_two_process_ddp_matches_one_process(two_process_runs, tmp_path):
    main_stage1.main([*DDP_RUN, "-r", str(tmp_path)])
    a, b = train_records(tmp_path / "rqvae"), train_records(two_process_runs / "rqvae_ddp" / "rqvae")
    assert len(a) == len(b) == 8
    for x, y in zip(a, b):
        assert x["loss_recon"] == pytest.approx(y["loss_recon"], rel=1e-4, abs=1e-6)
        assert x["loss_latent"] == pytest.approx(y["loss_latent"], rel=1e-3, abs=1e-6)


def test_bad_input_gives_one_clear_line(tmp_path, capsys):
    # the process itself, once: nothing but the line on stderr
    assert_one_line_error(run_cli("main_stage1.py", "-m", "configs/nope.yaml", "-r", str(tmp_path)),
                          "configs/nope.yaml", "not found")
    run = ["-m", CONFIG, "-r", str(tmp_path)]
    line = refused_in_process(capsys, main_stage1.main, [*run, "optimizer.lr=1"])
    assert "unknown override key 'optimizer.lr'" in line
    missing = [*run, "dataset.type=folder", f"dataset.root={tmp_path}/missing"]
    assert "missing" in refused_in_process(capsys, main_stage1.main, missing)
    line = refused_in_process(capsys, main_stage1.main, [*run, "--resume"])
    assert "--resume" in line and "last.pt" in line
    bad = tmp_path / "bad.yaml"
    bad.write_text("arch: {type: rq-vae, hparams: {n_embed: many}}\n")
    assert "n_embed" in refused_in_process(capsys, main_stage1.main, ["-m", str(bad), "-r", str(tmp_path)])
