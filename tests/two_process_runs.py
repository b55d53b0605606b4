"""The two-process runs the suite checks, all in one torchrun launch of two CPU processes (gloo), made once per
session by the `two_process_runs` fixture of tests/conftest.py (a launch costs a start-up of torch in three
processes, more than most of these runs):

- tests/test_fsdp.py: main_stage2.py trains a tiny GPT (next-patch stages, class dropout, clipping, gradient
  accumulation) and a tiny RQ-Transformer (EMA, class dropout, soft targets) under DDP and under FSDP; an FSDP run
  writes sharded checkpoints, stops and resumes by itself; an FSDP run continues a DDP run's checkpoint;
  main_stage1.py trains a tiny RQ-VAE (GAN, adaptive weight) under FSDP; the GPT goes through all three patch
  stages under DDP. Only one of these runs evaluates and draws previews: they cost more time than the training.
- tests/test_stage1_training.py: a tiny RQ-VAE under DDP.
- tests/test_stage2_training.py: scripts/extract_codes.py shards the codes of images over the two processes, and
  main_stage2.py trains an RQ-Transformer on them under DDP.
- tests/test_sampling_scripts.py: main_sampling_fid.py samples in shards.

Each test runs the one-process side itself.

    python -m torch.distributed.run --nproc_per_node=2 tests/two_process_runs.py OUT

OUT holds the inputs (`codes`: tests.helpers.write_learnable_codes; `images`: tests.helpers.write_shapes_images)
and receives one folder per run.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import main_sampling_fid  # noqa: E402
import main_stage1  # noqa: E402
import main_stage2  # noqa: E402
from common import dist  # noqa: E402
from scripts import extract_codes  # noqa: E402
from tests import test_sampling_scripts, test_stage1_training, test_stage2_training  # noqa: E402

DATA = os.path.join(ROOT, "tests", "data")
VQ = os.path.join(DATA, "npp", "vq_tiny.pt")  # 24 px -> 12x12 codes of 128 entries
FSDP = ["experiment.fsdp=true", "experiment.grad_checkpointing=true"]


def gpt_args(codes: str) -> list[str]:
    """32 items of 12x12 codes, 4 per process and micro-batch, 2 micro-batches per update: 4 steps an epoch, the
    first epoch in patches of 2x2 tokens; an EMA; no evaluation (test_freq past the end)."""
    return ["-m", "configs/shapes/stage2/npp-gpt.yaml", "-v", VQ, f"codes.train={codes}", "dataset.resolution=24",
            "arch.dim=32", "arch.n_layer=2", "arch.n_head=2", "npp.patch_level=2", "experiment.epochs=2",
            "experiment.batch_size=4", "experiment.total_batch_size=16",
            "npp.ema=0.9", "experiment.log_every=1", "experiment.test_freq=3", "experiment.eval_batches=1",
            "optimizer.init_lr=3e-3", "--device", "cpu"]


def patch_stage_args(codes: str) -> list[str]:
    """The GPT of gpt_args through three stages in 4 epochs (patches of 4x4 tokens, 2x2, then tokens) with no
    dropout of any kind, accumulation or evaluation: nothing random is left but the view each item trains on, drawn
    per item whatever the processes. Add experiment.batch_size: 8 in one process, 4 in each of two."""
    return ["-m", "configs/shapes/stage2/npp-gpt.yaml", "-v", VQ, f"codes.train={codes}", "dataset.resolution=24",
            "arch.dim=32", "arch.n_layer=2", "arch.n_head=2", "arch.class_dropout_prob=0.0", "experiment.epochs=4",
            "experiment.log_every=1", "optimizer.init_lr=3e-3", "--device", "cpu"]


RQ = ["-m", "configs/shapes/stage2/rqtransformer.yaml", "-v", os.path.join(DATA, "rqvae", "stage1", "model.pt"),
      "dataset.resolution=16", "dataset.num_samples=32", "arch.block_size=[8,8,3]", "arch.embed_dim=32",
      "arch.body.n_layer=2", "arch.head.n_layer=1", "experiment.batch_size=4", "experiment.epochs=1",
      "experiment.log_every=1", "experiment.test_freq=2", "--device", "cpu"]
# the tiny RQ-VAE of tests/test_run_directory.py: 16 images of 16x16, 8 per process, one step with its GAN terms
RQVAE = ["-m", "configs/shapes/stage1/rqvae.yaml", "dataset.resolution=16", "dataset.num_samples=16",
         "arch.ddconfig.resolution=16", "arch.ddconfig.ch_mult=[1,2]", "arch.hparams.latent_shape=[8,8,32]",
         "arch.hparams.n_embed=32", "experiment.batch_size=8", "experiment.epochs=1", "experiment.eval_batches=1",
         "--device", "cpu"]


def main(out: str) -> None:
    codes, images = os.path.join(out, "codes"), os.path.join(out, "images")
    gpt = gpt_args(codes)
    runs = [  # (folder, entry point, arguments but the output folder)
        ("gpt_ddp", main_stage2, gpt),
        ("gpt_fsdp", main_stage2, [*gpt, *FSDP, f"codes.val={codes}", "experiment.test_freq=2"]),  # evaluates, previews
        ("gpt_fsdp_dcp", main_stage2, [*gpt, *FSDP, "experiment.dcp=true", "experiment.max_steps=6"]),
        ("gpt_fsdp_dcp", main_stage2, [*gpt, *FSDP, "experiment.dcp=true"]),  # resumes by itself from last.dcp
        ("gpt_from_ddp", main_stage2, [*gpt, *FSDP, "--resume", "-l",
                                       os.path.join(out, "gpt_ddp", "npp-gpt", "epoch1_model.pt")]),
        ("rq_ddp", main_stage2, RQ),
        ("rq_fsdp", main_stage2, [*RQ, *FSDP]),
        ("rqvae_fsdp", main_stage1, [*RQVAE, "experiment.fsdp=true"]),
        ("gpt_stages", main_stage2, [*patch_stage_args(codes), "experiment.batch_size=4"]),
        ("rqvae_ddp", main_stage1, [*test_stage1_training.DDP_RUN, "experiment.batch_size=4"]),
        ("rq_codes", extract_codes, test_stage2_training.extraction_args(images)),
        ("rq_codes_ddp", main_stage2, [*test_stage2_training.ddp_training_args(os.path.join(out, "rq_codes")),
                                       "experiment.batch_size=4"]),
        ("sampled", main_sampling_fid, test_sampling_scripts.SHARDED_SAMPLING),
    ]
    output_flag = {main_stage1: "-r", main_stage2: "-r", extract_codes: "--output", main_sampling_fid: "--save-dir"}
    # One process group serves every run: each run's clean-up would close it, and a second group under torchrun's
    # store waits forever for a rendezvous that the first one used up.
    close_group, dist.cleanup = dist.cleanup, lambda: None
    for name, entry, args in runs:
        entry.main([*args, output_flag[entry], os.path.join(out, name)])
    close_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
