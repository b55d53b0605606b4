"""Memory per GPU of training each released prior size under DDP and under FSDP: a table, not a test.

    python benchmarks/bench_memory.py [--gpus 8 32 64] [--no-measure]

Parameters are counted on models built on the meta device from the configs under configs/ (nothing allocated).
A training process keeps, per parameter, its weight (4 bytes in fp32), its gradient (4), AdamW's two moments (8)
and the EMA (4): 20 bytes. DDP keeps all of it on every GPU; FSDP (experiment.fsdp) keeps 1/N of each on each of
N GPUs, and gathers one unit (a transformer block, or the root: embeddings, head and the rest) whole while it
computes: the last column is the largest unit's weights and gradients whole in fp32 (half the weights in bf16).
Activations, the frozen tokenizer and the CUDA workspace come on top.

The formula is checked on the CPU: two gloo processes shard a tiny GPT with FSDP, take one AdamW step, update the
EMA, and count the bytes of the shards each holds, against 20 bytes x parameters / 2.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from common.config import read_yaml, validate  # noqa: E402
from common.dist import DistEnv  # noqa: E402
from common.ema import ModelEMA  # noqa: E402
from common.fsdp import repeated_blocks, shard  # noqa: E402
from methods import PRIORS  # noqa: E402
from npp.gpt import GPT  # noqa: E402

BYTES_PER_PARAM = {"weights": 4, "gradients": 4, "AdamW moments": 8, "EMA": 4}  # fp32
TRAINING_BYTES = sum(BYTES_PER_PARAM.values())
GIB = 2 ** 30

RELEASED = [  # (name, config): the released sizes of each method
    ("GPT-B (NPP / LlamaGen)", "configs/imagenet/stage2/npp-gpt-B-256.yaml"),
    ("GPT-L", "configs/imagenet/stage2/npp-gpt-L-256.yaml"),
    ("GPT-XL", "configs/imagenet/stage2/npp-gpt-XL-256.yaml"),
    ("GPT-XXL", "configs/imagenet/stage2/npp-gpt-XXL-256.yaml"),
    ("RQ-Transformer FFHQ 350M", "configs/ffhq/stage2/ffhq256-rqtransformer-8x8x4-350M.yaml"),
    ("RQ-Transformer LSUN-cat 600M", "configs/lsun-cat/stage2/cat256-rqtransformer-8x8x4-600M.yaml"),
    ("RQ-Transformer ImageNet 480M", "configs/imagenet256/stage2/in256-rqtransformer-8x8x4-480M.yaml"),
    ("RQ-Transformer ImageNet 800M", "configs/imagenet256/stage2/in256-rqtransformer-8x8x4-800M.yaml"),
    ("RQ-Transformer ImageNet 1400M", "configs/imagenet256/stage2/in256-rqtransformer-8x8x4-1400M.yaml"),
    ("RQ-Transformer ImageNet 3800M", "configs/imagenet256/stage2/in256-rqtransformer-8x8x4-3800M.yaml"),
    ("RQ-Transformer CC-3M 650M (text)", "configs/cc3m/stage2/cc3m-rqtransformer-8x8x4-650M.yaml"),
    ("RQ-Transformer 3.9B text-to-image", "configs/cc3m/stage2/cc3m-cc12m-yfcc-rqtransformer-8x8x4-3.9B.yaml"),
    ("MAR-B", "configs/imagenet/mar/mar-base.yaml"),
    ("MAR-L", "configs/imagenet/mar/mar-large.yaml"),
    ("MAR-H", "configs/imagenet/mar/mar-huge.yaml"),
]
# What the tokenizer fills in at training time (each prior's `prepare`): the released tokenizers' values
TOKENIZER_VALUES = {"img_size": 256, "vae_stride": 16, "vae_embed_dim": 16}


def build_on_meta(path: str) -> torch.nn.Module:
    """The prior of a config, on the meta device (shapes only)."""
    raw = read_yaml(path)
    prior_type = PRIORS[raw["arch"]["type"]]
    config = validate(raw, prior_type.schema, path)
    arch = dict(config["arch"])
    filled = {**TOKENIZER_VALUES, "vocab_size": config["dataset"].get("vocab_size")}
    arch.update({key: value for key, value in filled.items() if key in arch and arch[key] is None})
    with torch.device("meta"):
        return prior_type.build(arch, path)


def units(model: torch.nn.Module) -> list[int]:
    """Parameters of each FSDP unit: the repeated blocks, then the root (everything else)."""
    blocks = [sum(p.numel() for p in block.parameters()) for block in repeated_blocks(model)]
    return [*blocks, sum(p.numel() for p in model.parameters()) - sum(blocks)]


def table(gpus: list[int]) -> None:
    header = ["model", "params", "DDP / GPU", *(f"FSDP {n} GPUs / GPU" for n in gpus), "largest unit whole"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, path in RELEASED:
        model = build_on_meta(path)
        sizes = units(model)
        params = sum(sizes)
        cells = [name, f"{params / 1e6:.1f}M", f"{params * TRAINING_BYTES / GIB:.1f} GiB",
                 *(f"{params * TRAINING_BYTES / n / GIB:.2f} GiB" for n in gpus),
                 f"{max(sizes) * 8 / GIB:.2f} GiB"]
        print("| " + " | ".join(cells) + " |")


# ----------------------------------------------------------------------------------------------
# The CPU check of the formula
# ----------------------------------------------------------------------------------------------

def local_bytes(tensors: Any) -> int:
    """Bytes this rank holds of tensors (a DTensor: its local shard)."""
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total


def tiny_gpt() -> GPT:
    return GPT(dim=64, n_layer=4, n_head=4, vocab_size=512, num_classes=10, image_tokens=64)


def held_bytes(model: torch.nn.Module, world_size: int, rank: int) -> dict[str, int]:
    """One AdamW step and EMA update of `model` (sharded when world_size > 1), then the bytes of each kind held."""
    if world_size > 1:
        shard(model, model, DistEnv(rank, world_size, rank, torch.device("cpu")), True, False)
    ema = ModelEMA(model, 0.999)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    codes = torch.randint(0, 512, (2, 8, 8), generator=torch.Generator().manual_seed(rank))
    model.loss(codes, torch.tensor([1, 2]))[0].backward()
    optimizer.step()
    ema.update(model)
    states = [value for state in optimizer.state.values() for value in state.values() if value.ndim > 0]
    return {"weights": local_bytes(model.parameters()), "gradients": local_bytes(p.grad for p in model.parameters()),
            "AdamW moments": local_bytes(states), "EMA": local_bytes(ema.shadow[name] for name in ema.averaged)}


def measure_rank(rank: int, port: int, results: Any) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    results[rank] = held_bytes(tiny_gpt(), 2, rank)
    dist.destroy_process_group()


def measure() -> None:
    torch.manual_seed(0)
    model = tiny_gpt()
    params = sum(p.numel() for p in model.parameters())
    single = held_bytes(model, 1, 0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(measure_rank, args=(port, results), nprocs=2)
    print(f"\nCPU check: a tiny GPT of {params:,} parameters, one AdamW step and EMA update")
    print("| bytes | formula, 1 process | measured, 1 process | formula / rank, FSDP on 2 | measured, rank 0 | "
          "measured, rank 1 |")
    print("|---|---|---|---|---|---|")
    for kind, per_param in [*BYTES_PER_PARAM.items(), ("total", TRAINING_BYTES)]:
        got = [sum(r.values()) if kind == "total" else r[kind] for r in (single, results[0], results[1])]
        print(f"| {kind} | {params * per_param:,} | {got[0]:,} | {params * per_param // 2:,} | {got[1]:,} | "
              f"{got[2]:,} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 32, 64], help="FSDP world sizes of the table")
    parser.add_argument("--no-measure", action="store_true", help="only the table, no CPU check")
    args = parser.parse_args()
    table(args.gpus)
    if not args.no_measure:
        measure()


if __name__ == "__main__":
    main()
