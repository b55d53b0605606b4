"""Encode a dataset split with any tokenizer into token shards for stage-2 training.

    python scripts/extract_codes.py --tokenizer results/rqvae/last.pt --split train --flip --output codes/train
    torchrun --nproc_per_node=8 scripts/extract_codes.py --tokenizer ffhq256/stage1/model.pt \\
        --data-root data/ffhq --split train --flip --output codes/ffhq-train

Images get the evaluation transform (resize, center crop); `--flip` also stores the codes of the
mirrored image, and stage-2 training picks one of the two per item and epoch. A discrete tokenizer's
shards hold its codes; a continuous one's the posterior moments of each image (float32), of which
training draws a fresh sample at every step. Shard k (images
[k*S, (k+1)*S)) is written by rank k % world_size in one atomic step, so an interrupted
extraction is resumed by running the same command again.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common import dist  # noqa: E402
from common.token_cache import shard_path, write_meta, write_shard  # noqa: E402
from common.data import build_dataset_from_config  # noqa: E402
from common.errors import cli_entry  # noqa: E402
from methods import load_tokenizer  # noqa: E402


@torch.no_grad()
def encode_shard(model, dataset, indices: range, batch_size: int, flip: bool, device, num_workers: int):
    """(tokens (N, A, ...), labels (N,)): codes, or the posterior moments of a continuous tokenizer."""
    encode = model.encode_moments if model.kind == "continuous" else model.encode_tokens
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers)
    tokens, labels = [], []
    for batch in loader:
        x = batch["image"].to(device)
        views = [encode(x)]
        if flip:
            views.append(encode(x.flip(-1)))
        tokens.append(torch.stack(views, dim=1).cpu())  # (B, A, *token shape)
        labels.append(batch["label"])
    return torch.cat(tokens).numpy(), torch.cat(labels).numpy()


@cli_entry
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="stage-1 checkpoint (ours or official)")
    parser.add_argument("--config", default=None, help="config of an official checkpoint that does not sit beside it")
    parser.add_argument("--output", required=True, help="folder for codes_*.npz and meta.json")
    parser.add_argument("--split", default="train")
    parser.add_argument("--data-root", default=None, help="dataset folder (default: the tokenizer config's)")
    parser.add_argument("--num-images", type=int, default=None, help="an evenly spaced subset of this size")
    parser.add_argument("--flip", action="store_true", help="also store the codes of the mirrored images")
    parser.add_argument("--shard-size", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    env = dist.setup(args.device)
    model, config = load_tokenizer(args.tokenizer, args.config)
    model = model.to(env.device).eval()
    dataset_cfg = dict(config["dataset"])
    if args.data_root:
        dataset_cfg["root"] = args.data_root
    if args.num_images:
        dataset_cfg["num_samples"] = args.num_images
    dataset = build_dataset_from_config(dataset_cfg, args.split, augment=False)

    num_shards = -(-len(dataset) // args.shard_size)
    mine = [k for k in range(env.rank, num_shards, env.world_size)
            if not os.path.isfile(shard_path(args.output, k))]
    for shard in tqdm(mine, desc=f"extract {args.split} (rank {env.rank})", disable=not env.is_main):
        indices = range(shard * args.shard_size, min(len(dataset), (shard + 1) * args.shard_size))
        codes, labels = encode_shard(model, dataset, indices, args.batch_size, args.flip, env.device,
                                     args.num_workers)
        write_shard(args.output, shard, codes, labels, np.asarray(indices))
    dist.barrier()
    if env.is_main:
        write_meta(args.output, {"tokenizer": os.path.abspath(args.tokenizer), "split": args.split,
                                 "num_images": len(dataset), "num_shards": num_shards, "shard_size": args.shard_size,
                                 "kind": model.kind, "token_shape": list(model.token_shape),
                                 **({"code_shape": list(model.code_shape), "vocab_size": model.vocab_size}
                                    if model.kind == "discrete" else {"scale_factor": model.scale_factor}),
                                 "augmentations": ["none", "flip"] if args.flip else ["none"]})
        print(f"{len(dataset)} images encoded into {num_shards} shard(s) in {args.output}")
    dist.cleanup()


if __name__ == "__main__":
    main()
