"""Stage-2 training through main_stage2.py on the codes of the official tiny RQ-VAE."""
import os
import shutil

import pytest
import torch

import main_stage2
from common.token_cache import CachedTokens
from tests.helpers import assert_resume_is_exact, train_records, DATA, assert_one_line_error, run_cli

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


def test_extracted_codes_sharded_over_two_processes_and_ddp_training(tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    from common.data import ShapesDataset
    from PIL import Image

    shapes = ShapesDataset("train", resolution=16, num_samples=40)
    for i in range(40):
        Image.fromarray(shapes.draw(i)).save(data / f"{i:03d}.png")
    extract = ["scripts/extract_codes.py", "--tokenizer", STAGE1, "--data-root", str(data), "--flip",
               "--shard-size", "12", "--num-workers", "0", "--device", "cpu"]
    two = run_cli("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541", *extract,
                  "--output", str(tmp_path / "codes2"))
    assert two.returncode == 0, two.stderr
    one = run_cli(*extract, "--output", str(tmp_path / "codes1"))
    assert one.returncode == 0, one.stderr
    a, b = CachedTokens(str(tmp_path / "codes1")), CachedTokens(str(tmp_path / "codes2"))
    assert len(a) == 40 and a.tokens.shape == (40, 2, 8, 8, 3)
    assert torch.equal(a.tokens, b.tokens)
    os.remove(tmp_path / "codes1" / "codes_00001.npz")  # an interrupted run: only the missing shard is redone
    again = run_cli(*extract, "--output", str(tmp_path / "codes1"))
    assert again.returncode == 0 and torch.equal(CachedTokens(str(tmp_path / "codes1")).tokens, b.tokens)

    # Training on the codes: 2 processes x 4 equals 1 process x 8 (no class dropout, no randomness left).
    train = [*TINY, f"codes.train={tmp_path / 'codes1'}", "loss.type=cross_entropy", "arch.class_dropout=0.0",
             "experiment.epochs=1", "--device", "cpu"]
    one = run_cli("main_stage2.py", "-m", CONFIG, "-r", str(tmp_path / "one"), *train)
    assert one.returncode == 0, one.stderr
    two = run_cli("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29542", "main_stage2.py",
                  "-m", CONFIG, "-r", str(tmp_path / "two"), *train, "experiment.batch_size=4")
    assert two.returncode == 0, two.stderr
    x, y = train_records(tmp_path / "one" / "rqtransformer"), train_records(tmp_path / "two" / "rqtransformer")
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


def test_bad_input_gives_one_clear_line(tmp_path):
    assert_one_line_error(run_cli("main_stage2.py", "-m", CONFIG, "-r", str(tmp_path)), "-v STAGE1")
    # a prior for 8x8x4 codes on a tokenizer of 8x8x3 codes
    assert_one_line_error(run_cli("main_stage2.py", "-m", CONFIG, "-r", str(tmp_path), "-v", STAGE1),
                          "block_size", "[8, 8, 3]")
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(STAGE1, lonely / "model.pt")
    assert_one_line_error(run_cli("main_stage2.py", "-m", CONFIG, "-r", str(tmp_path), "-v",
                                  str(lonely / "model.pt")), "config.yaml")


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
