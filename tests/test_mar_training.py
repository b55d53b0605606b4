"""MAR training and evaluation: main_mar.py (official flags) and main_stage2.py (YAML) on the shared loop.

A tiny KL-VAE of random weights (32 px shapes -> 4 x 4 latents of 4 channels) stands in for the KL-16
VAE; its latents of the built-in shapes are cached in the official layout. The official tiny training
checkpoint (tests/data/mar/mar_tiny: 5 x 5 tokens of 8 channels, 12 classes, 68 + 20 parameters in the
two AdamW groups, EMA and raw weights apart) is continued by main_mar.py and evaluated.
"""
from __future__ import annotations

import functools
import glob
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.testing import assert_close

import main_mar
import main_stage2
from common.checkpoint import save_checkpoint
from common.config import Config, apply_overrides, parse_overrides, read_yaml, validate
from common.dist import DistEnv, seed_everything
from common.metrics import write_random_inception_weights
from mar.cache import ShapeImages, cache_latents
from mar.model import MAR
from common.trainer import Position
from mar.stage2 import MAR_SCHEMA, MARStage2Task, lr_at, official_param_groups, prepare
from mar.vae import KLVAE
from methods import load_tokenizer
from scripts import sample
from tests.helpers import (DATA, assert_one_line_error, assert_resume_is_exact, run_cli, run_in_process,
                           train_records)

CONFIG = "configs/shapes/mar/mar.yaml"
OFFICIAL = os.path.join(DATA, "mar", "mar_tiny", "checkpoint-last.pth")
META = json.load(open(os.path.join(DATA, "mar", "meta.json")))
SMALL = ["arch.encoder_embed_dim=32", "arch.encoder_num_heads=2", "arch.encoder_depth=1", "arch.decoder_embed_dim=32",
         "arch.decoder_num_heads=2", "arch.decoder_depth=1", "arch.diffloss_w=32", "arch.num_sampling_steps=8",
         "experiment.batch_size=16", "experiment.log_every=1", "experiment.sample.num_iter=4"]
# The official tiny model as main_mar.py flags: what its args hold, and the widths its name cannot tell.
TINY = META["tiny_mar"]
OFFICIAL_FLAGS = [*(f"--{key}={TINY[key]}" for key in (
    "img_size", "vae_stride", "vae_embed_dim", "class_num", "buffer_size", "diffloss_d", "diffloss_w",
    "num_sampling_steps", "diffusion_batch_mul", "attn_dropout", "proj_dropout", "label_drop_prob",
    "mask_ratio_min")), "arch.model=null", "arch.norm_eps=1e-6",
    *(f"arch.{key}={TINY[key]}" for key in ("encoder_embed_dim", "encoder_depth", "encoder_num_heads",
                                            "decoder_embed_dim", "decoder_depth", "decoder_num_heads")),
    "--device", "cpu", "--num_workers", "0"]


def save_vae(path: str, **arch) -> str:
    """A KL-VAE of random weights saved as one of our checkpoints."""
    arch = {"type": "kl-vae", "ch": 32, "num_res_blocks": 1, "encoder_attn_resolutions": [],
            "decoder_attn_resolutions": [], **arch}
    torch.manual_seed(0)
    vae = KLVAE.from_config(arch)
    save_checkpoint(path, {"config": {"dataset": {"type": "shapes", "resolution": arch["resolution"]}, "arch": arch},
                           "kind": "kl-vae", "model": vae.state_dict()})
    return path


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> str:
    """32 px -> 4 x 4 latents of 4 channels (stride 8)."""
    return save_vae(str(tmp_path_factory.mktemp("vae") / "vae.pt"), embed_dim=4, ch_mult=[1, 1, 1, 1], resolution=32)


@pytest.fixture(scope="module")
def cache(vae, tmp_path_factory) -> str:
    """160 shapes (16 per class) in the official cache layout."""
    path = str(tmp_path_factory.mktemp("cache"))
    model = KLVAE.from_config(torch.load(vae, weights_only=True)["config"]["arch"])
    model.load_state_dict(torch.load(vae, weights_only=True)["model"])
    cache_latents(model.eval(), ShapeImages(32, 160), path, 32, torch.device("cpu"))
    return path


@pytest.fixture(scope="module")
def official_setup(tmp_path_factory) -> dict[str, str]:
    """The official tiny checkpoint in a folder of its own, a VAE of its latent shape (80 px -> 5 x 5 x 8) and a
    cache of 24 random moments in 12 class folders."""
    root = tmp_path_factory.mktemp("official")
    run = root / "run"
    run.mkdir()
    shutil.copy(OFFICIAL, run / "checkpoint-last.pth")
    vae = save_vae(str(root / "vae.pt"), embed_dim=8, ch_mult=[1, 1, 1, 1, 1], resolution=80)
    rng = np.random.default_rng(0)
    for i in range(24):
        folder = root / "cache" / f"n{i % 12:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        moments = [np.concatenate([rng.normal(size=(8, 5, 5)), rng.normal(-2.5, 0.4, size=(8, 5, 5))])
                   for _ in range(2)]
        np.savez(folder / f"{i}.JPEG.npz", moments=moments[0].astype(np.float32),
                 moments_flip=moments[1].astype(np.float32))
    return {"run": str(run), "vae": vae, "cache": str(root / "cache")}


def median_loss(records: list[dict]) -> float:
    return float(np.median([r["loss"] for r in records]))


def cached_run(vae: str, cache: str, output: str, *extra: str) -> list[str]:
    return ["--config", CONFIG, "--vae_path", vae, "--use_cached", "--cached_path", cache, "--output_dir", output,
            "--device", "cpu", "--num_workers", "0", *SMALL, *extra]


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def test_tiny_mar_learns_on_cached_shapes_latents_and_samples(vae, cache, tmp_path):
    run = tmp_path / "run"
    main_mar.main(cached_run(vae, cache, str(run), "--epochs", "3", "--online_eval", "--eval_freq", "3"))
    records = train_records(run)
    assert len(records) == 30 and records[-1]["epoch"] == 2
    assert median_loss(records[-10:]) < 0.5 * median_loss(records[:10])  # medians: t near 1000 gives spikes
    # warm-up over half an epoch, per iteration from the fractional epoch
    assert [r["lr"] for r in records[:5]] == pytest.approx([2e-3 * k / 10 / 0.5 for k in range(5)])
    ckpt = torch.load(run / "last.pt", weights_only=True)
    arch = ckpt["config"]["arch"]
    assert (arch["vae_embed_dim"], arch["vae_stride"], arch["img_size"]) == (4, 8, 32)  # read off the VAE
    assert [g["weight_decay"] for g in ckpt["optimizer"]["param_groups"]] == [0.0, 0.02]
    assert ckpt["ema"]["num_updates"] == 30 and (run / "images" / "epoch0003.png").is_file()

    out = tmp_path / "samples"
    sample.main(["-v", vae, "-a", str(run / "last.pt"), "num_iter=4", "--cfg", "3", "--classes", "1", "2",
                 "--output", str(out), "--device", "cpu"])
    latents = np.load(out / "latents.npy")
    assert latents.shape == (2, 4, 4, 4) and np.isfinite(latents).all()
    assert len(glob.glob(str(out / "0000*.png"))) == 2


def test_resume_dir_continues_a_sharded_checkpoint(vae, cache, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    main_mar.main(cached_run(vae, cache, str(first), "--epochs", "2", "experiment.dcp=true", "experiment.max_steps=4"))
    assert (first / "last.dcp").is_dir() and not (first / "last.pt").exists()
    main_mar.main(cached_run(vae, cache, str(second), "--epochs", "2", "--resume", str(first)))
    assert [r["step"] for r in train_records(second)] == list(range(5, 21))


def test_yaml_training_resumes_exactly(vae, tmp_path):
    # main_stage2.py on shapes images encoded on the fly; posterior samples, orders, masks and DiffLoss draws
    # all continue exactly
    args = ["-m", CONFIG, "-v", vae, *SMALL, "dataset.num_samples=64", "experiment.epochs=2",
            "experiment.eval_batches=1", "experiment.preview_images=2"]
    assert_resume_is_exact(main_stage2.main, args, tmp_path, "mar", stop_step=3, total_steps=8)


def test_torchrun_two_processes_keep_the_single_process_schedule(vae, cache, tmp_path):
    # Masks, orders and diffusion noise are drawn per process, as officially, so losses differ step by step
    # (the exact equivalence is pinned below); batches, steps and the learning rate of the global batch agree.
    args = [*cached_run(vae, cache, "OUT", "--epochs", "2"), "mar.lr=null", "mar.blr=0.032"]
    main_mar.main([str(tmp_path / "one") if a == "OUT" else a for a in args])
    two = run_cli("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29561", "main_mar.py",
                  *[str(tmp_path / "two") if a == "OUT" else a for a in args], "experiment.batch_size=8")
    assert two.returncode == 0, two.stderr
    x, y = train_records(tmp_path / "one"), train_records(tmp_path / "two")
    assert len(x) == 20 and x[5]["lr"] == pytest.approx(0.032 * 16 / 256)  # the peak, after half an epoch
    assert [(r["step"], r["epoch"], r["lr"]) for r in x] == [(r["step"], r["epoch"], r["lr"]) for r in y]
    assert all(math.isfinite(r["loss"]) for r in y)
    ckpt = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    assert ckpt["position"]["step"] == ckpt["ema"]["num_updates"] == 20 and len(ckpt["rng"]) == 2


def _distributed_steps(rank: int, world_size: int, init_file: str, config: dict, vae: str, batches: list, out: str):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(7 + rank)  # other initial weights on rank 1: DDP must take rank 0's, and the EMA with them
    task = tiny_task(config, vae, DistEnv(rank, world_size, rank, torch.device("cpu")))
    for step, halves in enumerate(batches):
        seed_everything(100 * step + rank)
        task.train_step(halves[rank], Position(step=step, batch_in_epoch=step))
    if rank == 1:
        torch.save({"model": task.model.state_dict(), "ema": task.ema.shadow}, out)
    torch.distributed.destroy_process_group()


def tiny_task(config: dict, vae: str, env: DistEnv) -> MARStage2Task:
    tokenizer, _ = load_tokenizer(vae)
    return MARStage2Task(prepare(Config(config), tokenizer, CONFIG), env, 4, tokenizer)


def test_two_processes_step_as_one_process_with_the_same_random_draws(vae, tmp_path):
    # Rank r's draws are made those of micro-batch r of one process accumulating over the global batch of 16.
    overrides = [*SMALL, "experiment.batch_size=8", "mar.warmup_epochs=0", "mar.ema_rate=0.5", "mar.grad_clip=0.5"]
    config = validate(apply_overrides(read_yaml(CONFIG), parse_overrides(overrides), MAR_SCHEMA, CONFIG), MAR_SCHEMA,
                      CONFIG).to_dict()
    generator = torch.Generator().manual_seed(0)
    batches = [[{"moments": torch.randn(8, 8, 4, 4, generator=generator) * 0.5,
                 "label": torch.randint(0, 10, (8,), generator=generator)} for _ in range(2)] for _ in range(3)]
    out = str(tmp_path / "rank1.pt")
    mp.spawn(_distributed_steps, args=(2, str(tmp_path / "init"), config, vae, batches, out), nprocs=2)

    config["experiment"]["total_batch_size"] = 16
    torch.manual_seed(7)
    task = tiny_task(config, vae, DistEnv(0, 1, 0, torch.device("cpu")))
    for step, halves in enumerate(batches):
        for rank, half in enumerate(halves):
            seed_everything(100 * step + rank)
            task.train_step(half, Position(step=step, batch_in_epoch=step))
    ranked = torch.load(out, weights_only=True)
    for key, value in task.model.state_dict().items():
        assert_close(ranked["model"][key], value, rtol=1e-5, atol=1e-6)
        assert_close(ranked["ema"][key], task.ema.shadow[key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(ranked["model"]["z_proj.weight"], ranked["ema"]["z_proj.weight"])


def test_optimizer_groups_are_the_official_ones():
    with torch.device("meta"):
        model = MAR(**TINY, norm_eps=1e-6)
    no_decay, decay = official_param_groups(model, 0.03)
    official = torch.load(OFFICIAL, weights_only=False)["optimizer"]["param_groups"]
    assert (len(no_decay["params"]), len(decay["params"])) == tuple(len(g["params"]) for g in official) == (68, 20)
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.03)
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"class_emb.weight", "fake_latent", "mask_token", "encoder_pos_embed_learned", "decoder_pos_embed_learned",
            "diffusion_pos_embed_learned", "z_proj.weight"} <= decayed
    assert not any("diffloss" in name or name.endswith(".bias") for name in decayed)


def test_learning_rate_follows_the_official_schedule():
    mar = {"warmup_epochs": 100, "lr_schedule": "cosine", "min_lr": 1e-5}
    assert lr_at(50.5, 8e-4, mar, 400) == pytest.approx(8e-4 * 50.5 / 100)
    assert lr_at(100, 8e-4, mar, 400) == pytest.approx(8e-4)
    assert lr_at(250, 8e-4, mar, 400) == pytest.approx(1e-5 + (8e-4 - 1e-5) * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_at(399.9, 8e-4, {**mar, "lr_schedule": "constant"}, 400) == 8e-4


# ----------------------------------------------------------------------------------------------
# The official tiny checkpoint
# ----------------------------------------------------------------------------------------------

def test_main_mar_continues_the_official_training_checkpoint(official_setup, tmp_path):
    out = tmp_path / "out"
    main_mar.main(["--resume", official_setup["run"], "--output_dir", str(out), "--vae_path", official_setup["vae"],
                   "--use_cached", "--cached_path", official_setup["cache"], "--epochs", "2", "--batch_size", "4",
                   "--warmup_epochs", "0", "--lr", "1e-3", *OFFICIAL_FLAGS, "experiment.log_every=1"])
    records = train_records(out)
    assert [r["epoch"] for r in records] == [1] * 6  # the official file finished epoch 0
    official = torch.load(OFFICIAL, weights_only=False)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["position"]["epoch"] == 2
    groups = ckpt["optimizer"]["param_groups"]
    assert [len(g["params"]) for g in groups] == [68, 20] and groups[1]["weight_decay"] == 0.03  # the file's
    # the EMA continues the file's model_ema (0.9999 per step), which is 9.5e-3 away from its model
    gap = max((ckpt["ema"]["shadow"][k] - official["model_ema"][k]).abs().max().item() for k in official["model_ema"])
    assert gap < 1e-3

    # without optimizer state (as the released files): the weights and EMA, from epoch 0
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    torch.save({key: official[key] for key in ("model", "model_ema", "args")}, weights_only / "checkpoint-last.pth")
    main_mar.main(["--resume", str(weights_only), "--output_dir", str(tmp_path / "again"), "--vae_path",
                   official_setup["vae"], "--use_cached", "--cached_path", official_setup["cache"], "--epochs", "1",
                   "--batch_size", "4", "--warmup_epochs", "0", *OFFICIAL_FLAGS])
    assert [r["epoch"] for r in train_records(tmp_path / "again")] == [0]
    ckpt = torch.load(tmp_path / "again" / "last.pt", weights_only=True)
    assert [g["weight_decay"] for g in ckpt["optimizer"]["param_groups"]] == [0.0, 0.02]  # the flags'
    gap = max((ckpt["ema"]["shadow"][k] - official["model_ema"][k]).abs().max().item() for k in official["model_ema"])
    assert gap < 1e-3


def test_evaluate_writes_the_official_folder_and_scores(official_setup, tmp_path):
    inception = write_random_inception_weights(str(tmp_path / "inception.pth"))
    out = tmp_path / "eval"
    results = main_mar.main(["--evaluate", "--resume", official_setup["run"], "--output_dir", str(out),
                             "--vae_path", official_setup["vae"], "--num_images", "12", "--eval_bsz", "5",
                             "--num_iter", "4", "--cfg", "2.5", "--inception-weights", inception,
                             "--stats-dir", str(tmp_path), *OFFICIAL_FLAGS])
    folder = out / "ariter4-diffsteps8-temp1.0-linearcfg2.5-image12_ema_evaluate"
    assert sorted(os.listdir(folder)) == [f"{i:05d}.png" for i in range(12)] + ["metrics.json", "samples.npz"]
    with np.load(folder / "samples.npz") as npz:
        assert npz["arr_0"].shape == (12, 80, 80, 3) and npz["arr_0"].dtype == np.uint8
        assert npz["labels"].tolist() == list(range(12))
    assert results["ema"] and results["is_mean"] > 0 and "fid" not in results  # no adm_in256 statistics here


def test_evaluate_without_inception_weights_still_writes_the_images(official_setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    main_mar.main(["--evaluate", "--resume", official_setup["run"], "--output_dir", str(tmp_path), "--vae_path",
                   official_setup["vae"], "--num_images", "12", "--eval_bsz", "12", "--num_iter", "2",
                   *OFFICIAL_FLAGS])
    assert len(glob.glob(str(tmp_path / "*_evaluate" / "*.png"))) == 12
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "not scored" in notes[0]


def test_bad_input_gives_one_clear_line(official_setup, tmp_path, capsys):
    run_mar = functools.partial(run_in_process, main_mar.main)
    base = ["--output_dir", str(tmp_path), "--vae_path", official_setup["vae"], "--num_images", "12", *OFFICIAL_FLAGS]
    assert_one_line_error(run_mar([*base, "--evaluate", "--resume", str(tmp_path)], capsys), "--evaluate",
                          "checkpoint-last.pth")
    assert_one_line_error(run_mar([*base, "--evaluate", "--resume", official_setup["run"], "--num_images", "10"],
                                  capsys), "--num_images 10", "--class_num 12")
    assert_one_line_error(run_mar([*base, "--cfg_schedule", "cosine"], capsys), "--cfg_schedule", "cosine")
    assert_one_line_error(run_mar([*base, "--evaluate", "--resume", official_setup["run"], "--vae_embed_dim", "16"],
                                  capsys), "--vae_embed_dim", "16", "8")
    assert_one_line_error(run_mar([*base, "--use_cached"], capsys), "--use_cached", "--cached_path")
    for flag, key in (("--batch_size", "experiment.batch_size"), ("--diffloss_w", "arch.diffloss_w"),
                      ("--diffusion_batch_mul", "arch.diffusion_batch_mul")):
        assert_one_line_error(run_mar([*base, flag, "0"], capsys), key, "at least 1")
    assert_one_line_error(run_mar([*base, "--label_drop_prob", "-0.1"], capsys), "arch.label_drop_prob", "at least 0")
    (tmp_path / "blocker").write_text("a file")
    run = ["--output_dir", str(tmp_path / "blocker" / "run"), *base[2:], "--use_cached", "--cached_path",
           official_setup["cache"]]
    assert_one_line_error(run_mar(run, capsys), "--output_dir", "blocker, which is a file")
    assert sorted(os.listdir(tmp_path)) == ["blocker"]
    # the process itself, once: nothing but the line on stderr
    assert_one_line_error(run_cli("main_mar.py", *base, "--cfg_schedule", "cosine"), "--cfg_schedule")
