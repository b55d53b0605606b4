"""The training runs tests/test_fsdp.py checks, all in one torchrun launch of two CPU processes (gloo):
main_stage2.py trains a tiny GPT (next-patch stages, class dropout, clipping, gradient accumulation) and a tiny
RQ-Transformer (EMA, class dropout, soft targets) under DDP and under FSDP; an FSDP run writes sharded
checkpoints, stops and resumes by itself; an FSDP run continues a DDP run's checkpoint; main_stage1.py trains a
tiny RQ-VAE (GAN, adaptive weight) under FSDP. Only one run evaluates and
draws previews: they cost more time than the training.

    python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_runs.py OUT CODES
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import main_stage1  # noqa: E402
import main_stage2  # noqa: E402
from common import dist  # noqa: E402

DATA = os.path.join(ROOT, "tests", "data")
VQ = os.path.join(DATA, "npp", "vq_tiny.pt")  # 24 px -> 12x12 codes of 128 entries
FSDP = ["experiment.fsdp=true", "experiment.grad_checkpointing=true"]


def gpt_args(codes: str) -> list[str]:
    """32 items of 12x12 codes, 4 per process and micro-batch, 2 micro-batches per update: 4 steps an epoch, the
    first epoch in patches of 2x2 tokens; an EMA; no evaluation (test_freq past the end)."""
    return ["-m", "configs/shapes/stage2/npp-gpt.yaml", "-v", VQ, f"codes.train={codes}", "dataset.resolution=24",
            "arch.dim=32", "arch.n_layer=2", "arch.n_head=2", "npp.patch_level=2", "experiment.epochs=2", "experiment.batch_size=4", "experiment.total_batch_size=16",
            "npp.ema=0.9", "experiment.log_every=1", "experiment.test_freq=3", "experiment.eval_batches=1",
            "optimizer.init_lr=3e-3", "--device", "cpu"]


RQ = ["-m", "configs/shapes/stage2/rqtransformer.yaml", "-v", os.path.join(DATA, "rqvae", "stage1", "model.pt"),
      "dataset.resolution=16", "dataset.num_samples=32", "arch.block_size=[8,8,3]", "arch.embed_dim=32",
      "arch.body.n_layer=2", "arch.head.n_layer=1", "experiment.batch_size=4", "experiment.epochs=1",
      "experiment.log_every=1", "experiment.test_freq=2", "--device", "cpu"]
# the tiny RQ-VAE of tests/test_run_directory.py: 16 images of 16x16, 8 per process, one step with its GAN terms
RQVAE = ["-m", "configs/shapes/stage1/rqvae.yaml", "dataset.resolution=16", "dataset.num_samples=16",
         "arch.ddconfig.resolution=16", "arch.ddconfig.ch_mult=[1,2]", "arch.hparams.latent_shape=[8,8,32]",
         "arch.hparams.n_embed=32", "experiment.batch_size=8", "experiment.epochs=1", "experiment.eval_batches=1",
         "--device", "cpu"]


def main(out: str, codes: str) -> None:
    gpt = gpt_args(codes)
    runs = [
        ("gpt_ddp", gpt),
        ("gpt_fsdp", [*gpt, *FSDP, f"codes.val={codes}", "experiment.test_freq=2"]),  # evaluates, previews
        ("gpt_fsdp_dcp", [*gpt, *FSDP, "experiment.dcp=true", "experiment.max_steps=6"]),
        ("gpt_fsdp_dcp", [*gpt, *FSDP, "experiment.dcp=true"]),  # resumes by itself from last.dcp
        ("gpt_from_ddp", [*gpt, *FSDP, "--resume", "-l", os.path.join(out, "gpt_ddp", "npp-gpt", "epoch1_model.pt")]),
        ("rq_ddp", RQ),
        ("rq_fsdp", [*RQ, *FSDP]),
        ("rqvae_fsdp", [*RQVAE, "experiment.fsdp=true"]),
    ]
    # One process group serves every run: each run's clean-up would close it, and a second group under torchrun's
    # store waits forever for a rendezvous that the first one used up.
    close_group, dist.cleanup = dist.cleanup, lambda: None
    for name, args in runs:
        main = main_stage1 if name.startswith("rqvae") else main_stage2
        main.main([*args, "-r", os.path.join(out, name)])
    close_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
