"""What a training run leaves in its directory after a kill: the next start removes a half-written
checkpoint and cuts metrics.jsonl back to its checkpoint, so a resumed run holds one record per step."""
from __future__ import annotations

import json
import os

import main_stage1
from common.checkpoint import remove_stale_temporaries
from common.runlog import read_metrics
from tests.helpers import train_records

CONFIG = "configs/shapes/stage1/rqvae.yaml"
# 16 images of 16x16 in batches of 8: two steps an epoch, every step logged
TINY = ["dataset.resolution=16", "dataset.num_samples=16", "arch.ddconfig.resolution=16", "arch.ddconfig.ch_mult=[1,2]",
        "arch.hparams.latent_shape=[8,8,32]", "arch.hparams.n_embed=32", "experiment.batch_size=8",
        "experiment.log_every=1", "experiment.eval_batches=1", "experiment.num_workers=0", "--device", "cpu"]
NO_SUCH_PROCESS = 99_999_999  # above any pid_max


def test_only_temporaries_of_processes_gone_are_removed(tmp_path):
    running = f".last.pt.tmp{os.getppid()}"  # a writer that still runs keeps its file
    for name in (running, f".last.pt.tmp{NO_SUCH_PROCESS}", f".epoch2_model.pt.tmp{NO_SUCH_PROCESS}", "last.pt"):
        (tmp_path / name).write_bytes(b"")
    assert remove_stale_temporaries(str(tmp_path)) == [f".epoch2_model.pt.tmp{NO_SUCH_PROCESS}",
                                                       f".last.pt.tmp{NO_SUCH_PROCESS}"]
    assert sorted(os.listdir(tmp_path)) == [running, "last.pt"]


def test_resume_after_a_kill_removes_the_half_written_checkpoint_and_logs_each_step_once(tmp_path):
    args = ["-m", CONFIG, "-r", str(tmp_path), *TINY, "experiment.epochs=2"]
    main_stage1.main([*args, "experiment.max_steps=3"])
    run = tmp_path / "rqvae"
    # what a kill after the checkpoint of step 3 leaves: a later step's record, half a line, half a checkpoint
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"split": "train", "step": 4, "epoch": 1, "loss": 1.0}) + "\n")
        f.write(json.dumps({"split": "val", "step": 4, "epoch": 2, "val_loss": 1.0}) + "\n")
        f.write('{"split": "train", "st')
    stale = run / f".last.pt.tmp{NO_SUCH_PROCESS}"
    stale.write_bytes(b"PK\x03\x04 cut short")
    main_stage1.main([*args, "--resume"])
    assert [r["step"] for r in train_records(run)] == [1, 2, 3, 4]
    assert [r["step"] for r in read_metrics(str(run / "metrics.jsonl")) if r["split"] == "val"] == [2, 4]
    assert not stale.exists()
    assert f"removed .last.pt.tmp{NO_SUCH_PROCESS}" in (run / "train.log").read_text()
