"""Next-patch prediction over two gloo processes: the patch-size stages train as in one process."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from common.llamagen_codes import output_folders, write_image_codes
from tests.helpers import DATA, run_cli, train_records

VQ = os.path.join(DATA, "npp", "vq_tiny.pt")  # 24 px -> 12x12 codes of 128 entries


def test_two_processes_train_the_patch_stages_as_one_process_at_the_same_global_batch(tmp_path):
    # LlamaGen code files (two views each) of 32 images, codes that their class makes learnable; no dropout of
    # any kind, so nothing random is left but the view each item trains on, drawn per item whatever the processes.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 32)
    codes = labels[:, None, None, None] * 12 + rng.integers(0, 4, (32, 2, 12, 12))
    write_image_codes(output_folders(str(tmp_path / "codes"), "imagenet24"), np.arange(32), codes, labels)
    train = ["main_stage2.py", "-m", "configs/shapes/stage2/npp-gpt.yaml", "-v", VQ,
             f"codes.train={tmp_path / 'codes'}", "dataset.resolution=24", "arch.dim=32", "arch.n_layer=2", "arch.n_head=2", "arch.class_dropout_prob=0.0",
             "experiment.epochs=4", "experiment.log_every=1", "optimizer.init_lr=3e-3", "--device", "cpu"]
    one = run_cli(*train, "-r", str(tmp_path / "one"), "experiment.batch_size=8")
    assert one.returncode == 0, one.stderr
    two = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *train,
                  "-r", str(tmp_path / "two"), "experiment.batch_size=4")
    assert two.returncode == 0, two.stderr

    x, y = train_records(tmp_path / "one" / "npp-gpt"), train_records(tmp_path / "two" / "npp-gpt")
    assert [r["patch_size"] for r in x] == [r["patch_size"] for r in y] == [16] * 4 + [4] * 4 + [1] * 8
    assert [r["lr"] for r in x] == [r["lr"] for r in y]
    assert x[-1]["loss"] < x[0]["loss"] - 0.5  # it learns, so equal steps mean something
    for r, s in zip(x, y):
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-4)
        assert r["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-3)
    a = torch.load(tmp_path / "one" / "npp-gpt" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "npp-gpt" / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
