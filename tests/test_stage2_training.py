"""Stage-2 training through main_stage2.py on the codes of the official tiny RQ-VAE."""
import os
import shutil

import pytest
import torch

import main_stage2
from common.token_cache import CachedTokens
from scripts import extract_codes
from tests.helpers import (DATA, assert_one_line_error, assert_resume_is_exact, refused_in_process, run_cli,
                           train_records)

CONFIG = "configs/shapes/stage2/rqtransformer.yaml"
STAGE1 = os.path.join(DATA, "rqvae", "stage1", "model.pt")  # 16x16 images -> 8x8x3 codes, 32 codes
STAGE2 = os.path.join(DATA, "rqvae", "stage2", "model.pt")
TINY = ["-v", STAGE1, "dataset.resolution=16", "dataset.num_samples=64", "arch.block_size=[8,8,3]",
        "arch.embed_dim=32", "arch.body.n_layer=2", "arch.head.n_layer=1", "experiment.batch_size=8",
        "experiment.log_every=1", "experiment.eval_batches=2", "experiment.sample.top_k=4"]


def test_tiny_training_loss_falls_with_soft_targets(tmp_path):
    main_stage2.main(["-m", CONFIG, "-r", str(tmp_path), *TINY, "experiment.epochs=3", "optimizer.init_lr=3e-3"])
    records = train_records(tmp_path / "rqtransformer")
    assert len(records) == 24
    first = sum(r["loss"] for r in records[:3]) / 3
    last = sum(r["loss"] for r in records[-3:]) / 3
    assert last < first - 0.15  # soft targets of a random RQ-VAE: the floor is their own entropy
    ckpt = torch.load(tmp_path / "rqtransformer" / "last.pt", weights_only=True)
    assert set(ckpt) >= {"model", "ema", "optimizer", "scheduler", "config", "rng", "position"}
    assert ckpt["config"]["vqvae"]["ckpt"] == STAGE1
    assert (tmp_path / "rqtransformer" / "images" / "epoch0003.png").is_file()


def test_resume_continues_exactly(tmp_path):
    assert_resume_is_exact(main_stage2.main, ["-m", CONFIG, *TINY, "experiment.epochs=2"], tmp_path, "rqtransformer", stop_step=5,
                           total_steps=16)


def extraction_args(images: str) -> list[str]:
    """scripts/extract_codes.py on a folder of 16 px images, shards of 12 (tests/two_process_runs.py: 2 processes)."""
    return ["--tokenizer", STAGE1, "--data-root", images, "--flip", "--shard-size", "12", "--num-workers", "0",
            "--device", "cpu"]


def ddp_training_args(codes: str) -> list[str]:
    """Training on the codes, no class dropout: no randomness left, so 2 processes x 4 (tests/two_process_runs.py)
    equal 1 process x 8."""
    return ["-m", CONFIG, *TINY, f"codes.train={codes}", "loss.type=cross_entropy", "arch.class_dropout=0.0",
            "experiment.epochs=1", "--device", "cpu"]


def test_extracted_codes_sharded_over_two_processes_and_ddp_training(two_process_runs, tmp_path):
    extract = extraction_args(str(two_process_runs / "images"))  # 40 shapes
    extract_codes.main([*extract, "--output", str(tmp_path / "codes")])  # one thread, as each worker
    a, b = CachedTokens(str(tmp_path / "codes")), CachedTokens(str(two_process_runs / "rq_codes"))
    assert len(a) == 40 and a.tokens.shape == (40, 2, 8, 8, 3)
    assert torch.equal(a.tokens, b.tokens)
    os.remove(tmp_path / "codes" / "codes_00001.npz")  # an interrupted run: only the missing shard is redone
    extract_codes.main([*extract, "--output", str(tmp_path / "codes")])
    assert torch.equal(CachedTokens(str(tmp_path / "codes")).tokens, b.tokens)

    main_stage2.main([*ddp_training_args(str(tmp_path / "codes")), "-r", str(tmp_path / "one")])
    x = train_records(tmp_path / "one" / "rqtransformer")
    y = train_records(two_process_runs / "rq_codes_ddp" / "rqtransformer")
    assert len(x) == len(y) == 5
    for r, s in zip(x, y):
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-4)


def test_official_stage2_checkpoint_as_starting_point(tmp_path):
    # The released config.yaml itself is the config; its dataset is switched to the built-in shapes.
    config = os.path.join(DATA, "rqvae", "stage2", "config.yaml")
    main_stage2.main(["-m", config, "-r", str(tmp_path), "-v", STAGE1, "-l", STAGE2, "--eval",
                      "dataset.type=shapes", "dataset.transforms.type=none", "dataset.resolution=16",
                      "dataset.num_samples=16", "loss.type=cross_entropy", "experiment.eval_batches=1"])
    results = __import__("json").load(open(tmp_path / "config" / "eval.json"))
    assert 0 < results["val"]["val_loss"] < 10


def test_bad_input_gives_one_clear_line(tmp_path, capsys):
    # the process itself, once: nothing but the line on stderr
    assert_one_line_error(run_cli("main_stage2.py", "-m", CONFIG, "-r", str(tmp_path)), "-v STAGE1")
    # a prior for 8x8x4 codes on a tokenizer of 8x8x3 codes
    line = refused_in_process(capsys, main_stage2.main, ["-m", CONFIG, "-r", str(tmp_path), "-v", STAGE1])
    assert "block_size" in line and "[8, 8, 3]" in line
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(STAGE1, lonely / "model.pt")
    line = refused_in_process(capsys, main_stage2.main, ["-m", CONFIG, "-r", str(tmp_path), "-v",
                                                         str(lonely / "model.pt")])
    assert "config.yaml" in line


def test_official_stage2_yaml_trains_with_overrides(tmp_path):
    # The official FFHQ file, shrunk on the command line to the tiny RQ-VAE; global batch 16 = 2 x 8 accumulated.
    main_stage2.main(["-m", "configs/ffhq/stage2/ffhq256-rqtransformer-8x8x4-350M.yaml", "-r", str(tmp_path),
                      "-v", STAGE1, "dataset.type=shapes", "dataset.transforms.type=none", "dataset.resolution=16",
                      "dataset.num_samples=32", "dataset.vocab_size=32", "arch.block_size=[8,8,3]",
                      "arch.input_embed_dim=8", "arch.embed_dim=16", "arch.body.n_layer=1", "arch.head.n_layer=1",
                      "arch.body.block.n_head=2", "arch.head.block.n_head=2", "experiment.batch_size=8",
                      "experiment.total_batch_size=16", "experiment.epochs=1", "experiment.log_every=1",
                      "experiment.sample.top_k=4"])
    run = tmp_path / "ffhq256-rqtransformer-8x8x4-350M"
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["config"]["arch"]["vocab_size"] == 32 and ckpt["config"]["optimizer"]["max_gn"] == 1.0
    assert ckpt["position"]["step"] == 4  # batches of 8
    assert int(ckpt["optimizer"]["state"][0]["step"]) == 2  # updates of 16
