"""Elastic restarts: a run whose worker group crashes mid-epoch under torchrun's restarts (scripts/launch/stage2.sh
with MAX_RESTARTS=1) resumes by itself from its run directory's last checkpoint and ends with the weights of an
uninterrupted run. The crash comes from the fault-injection hook of common/fault_injection.py."""
from __future__ import annotations

import os
import subprocess
import sys

import main_stage2
from common.fault_injection import FAULT_VARIABLE
from tests.helpers import ROOT, refused_in_process, train_records, write_learnable_codes
from tests.test_fsdp import assert_close_weights, checkpoint
from tests.test_launch_scripts import free_port
from tests.two_process_runs import gpt_args


def test_a_run_killed_mid_epoch_restarts_by_itself_and_ends_as_an_uninterrupted_run(tmp_path):
    # 8 steps (4 an epoch), last.pt every 2 steps; rank 1 dies after step 7, so the restart continues from step 6
    args = [*gpt_args(write_learnable_codes(tmp_path / "codes")), "arch.class_dropout_prob=0.0",
            "experiment.save_every_steps=2", "experiment.fsdp=true"]
    marker = tmp_path / "crashed"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "NPROC_PER_NODE": "2", "MAX_RESTARTS": "1",
           "MASTER_PORT": str(free_port()), "TORCHRUN": f"{sys.executable} -m torch.distributed.run",
           FAULT_VARIABLE: f"7:1:{marker}"}
    result = subprocess.run(["bash", "scripts/launch/stage2.sh", *args, "-r", str(tmp_path / "elastic")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.exists()  # rank 1 did crash once
    run = tmp_path / "elastic" / "npp-gpt"
    assert [r["step"] for r in train_records(run)] == list(range(1, 9))  # each step logged once
    assert "at epoch 1, step 6 (the run directory's last checkpoint" in (run / "train.log").read_text()

    # uninterrupted, in one process at the same global batch (experiment.fsdp there: a plain run, with a note)
    main_stage2.main([*args, "-r", str(tmp_path / "one"), "experiment.batch_size=8"])
    one = tmp_path / "one" / "npp-gpt"
    assert "note: experiment.fsdp shards over several processes" in (one / "train.log").read_text()
    assert_close_weights(checkpoint(one / "last.pt")["model"], checkpoint(run / "last.pt")["model"])


def test_a_run_directory_holding_another_configs_checkpoint_is_one_line_and_fresh_starts_over(tmp_path, capsys):
    args = [*gpt_args(write_learnable_codes(tmp_path / "codes")), "-r", str(tmp_path), "experiment.batch_size=8"]
    main_stage2.main([*args, "experiment.max_steps=2"])
    capsys.readouterr()
    line = refused_in_process(capsys, main_stage2.main, [*args, "arch.dim=48"])  # resumes by itself: shapes differ
    assert "shape mismatches" in line and "--fresh" in line
    main_stage2.main([*args, "arch.dim=48", "experiment.max_steps=1", "--fresh"])
    assert [r["step"] for r in train_records(tmp_path / "npp-gpt")] == [1]  # the old run's records are gone
    assert checkpoint(tmp_path / "npp-gpt" / "last.pt")["config"]["arch"]["dim"] == 48
