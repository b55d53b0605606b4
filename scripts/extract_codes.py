"""Encode a dataset split with any tokenizer into token shards for stage-2 training.

    python scripts/extract_codes.py --tokenizer results/rqvae/last.pt --split train --flip --output codes/train
    torchrun --nproc_per_node=8 scripts/extract_codes.py --tokenizer ffhq256/stage1/model.pt \\
        --data-root data/ffhq --split train --flip --output codes/ffhq-train
    torchrun --nproc_per_node=8 scripts/extract_codes.py --tokenizer vq_ds16_c2i.pt --data-root data/imagenet \\
        --layout llamagen --ten-crop --crop-range 1.1 --output codes/imagenet_ten_crop   # LlamaGen's files

Images get the evaluation transform (resize, center crop); `--flip` also stores the codes of the
mirrored image, and stage-2 training picks one of the views per item and epoch. `--ten-crop` stores
LlamaGen's ten views instead (ADM centre crop to int(size * crop range), four corners and the
centre, then the same of the mirror). A discrete tokenizer's shards hold its codes; a continuous
one's the posterior moments of each image (float32), of which training draws a fresh sample at every
step. Shard k (images [k*S, (k+1)*S)) is written by rank k % world_size in one atomic step, so an
interrupted extraction is resumed by running the same command again.

`--layout llamagen` writes LlamaGen's files instead (common/llamagen_codes.py): `<dataset><size>_codes/{i}.npy`
(int64 (1, views, h*w)) and `<dataset><size>_labels/{i}.npy`, with LlamaGen's transforms: the ten-crop,
or the ADM centre crop and its mirror. Rerunning it encodes the images that have no files yet.
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
from common.errors import DataError, cli_entry  # noqa: E402
from common.flags import at_least  # noqa: E402
from common.llamagen_codes import (TEN_CROP_VIEWS, ExtractionCrop, output_folders, write_image_codes,  # noqa: E402
                                   written_indices)
from common.paths import check_output_dir  # noqa: E402
from common.weights import resolve_checkpoint  # noqa: E402
from methods import load_tokenizer  # noqa: E402


@torch.no_grad()
def encode_shard(model, dataset, indices: range, batch_size: int, flip: bool, device, num_workers: int):
    """(tokens (N, A, ...), labels (N,)): codes, or the posterior moments of a continuous tokenizer. Images come
    one view each (B, 3, H, W), mirrored too with `flip`, or A views each (B, A, 3, H, W)."""
    encode = model.encode_moments if model.kind == "continuous" else model.encode_tokens
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers)
    tokens, labels = [], []
    for batch in loader:
        x = batch["image"].to(device)
        if x.ndim == 5:
            views = encode(x.flatten(0, 1)).unflatten(0, x.shape[:2])
        else:
            views = torch.stack([encode(x)] + ([encode(x.flip(-1))] if flip else []), dim=1)
        tokens.append(views.cpu())  # (B, A, *token shape)
        labels.append(batch["label"])
    return torch.cat(tokens).numpy(), torch.cat(labels).numpy()


def check_views(args: argparse.Namespace, model: torch.nn.Module) -> None:
    """Refuse flag combinations that cannot be written, before anything is encoded."""
    if args.ten_crop and args.flip:
        raise DataError("--flip and --ten-crop: the ten crops already hold the mirrored views; drop --flip")
    if args.layout == "llamagen" and (model.kind != "discrete" or len(model.token_shape) != 2):
        raise DataError(f"--layout llamagen holds a grid of codes per view; this tokenizer makes {model.kind} tokens "
                        f"of shape {list(model.token_shape)}; use the default layout (shards)")


@cli_entry
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="stage-1 checkpoint (ours or official)")
    parser.add_argument("--config", default=None, help="config of an official checkpoint that does not sit beside it")
    parser.add_argument("--output", required=True, help="folder for codes_*.npz and meta.json (or LlamaGen's folders)")
    parser.add_argument("--layout", choices=("shards", "llamagen"), default="shards",
                        help="shards: our codes_*.npz; llamagen: one .npy per image, as LlamaGen's "
                             "extract_codes_c2i.py")
    parser.add_argument("--split", default="train")
    parser.add_argument("--data-root", default=None, help="dataset folder (default: the tokenizer config's)")
    parser.add_argument("--num-images", type=at_least(1), default=None, help="an evenly spaced subset of this size")
    parser.add_argument("--flip", action="store_true", help="also store the codes of the mirrored images")
    parser.add_argument("--ten-crop", action="store_true", help="LlamaGen's ten views of a larger centre crop")
    parser.add_argument("--crop-range", type=float, default=1.1, help="ten-crop: centre crop to size x this first")
    parser.add_argument("--image-size", type=at_least(1), default=None,
                        help="resolution images are encoded at (default: the tokenizer config's dataset.resolution)")
    parser.add_argument("--shard-size", type=at_least(1), default=10000)
    parser.add_argument("--batch-size", type=at_least(1), default=64)
    parser.add_argument("--num-workers", type=at_least(0), default=4)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    check_output_dir(args.output, "--output")
    args.tokenizer, args.config = resolve_checkpoint(args.tokenizer, args.config)  # meta.json records the file

    env = dist.setup(args.device)
    model, config = load_tokenizer(args.tokenizer, args.config)
    model = model.to(env.device).eval()
    dataset_cfg = dict(config["dataset"])
    if args.data_root:
        dataset_cfg["root"] = args.data_root
    if args.num_images:
        dataset_cfg["num_samples"] = args.num_images
    if args.image_size:
        dataset_cfg["resolution"] = args.image_size
    dataset = build_dataset_from_config(dataset_cfg, args.split, augment=False)
    llamagen = args.layout == "llamagen"
    check_views(args, model)
    size = dataset_cfg.get("resolution") or model.image_size
    if args.ten_crop or llamagen:  # LlamaGen's transforms
        dataset.transform = ExtractionCrop(size, args.crop_range if args.ten_crop else None)
    flip = args.flip or (llamagen and not args.ten_crop)
    folders = output_folders(args.output, f"{dataset_cfg['type']}{size}")
    written = written_indices(folders) if llamagen else set()

    def done(shard: int, indices: range) -> bool:
        return written.issuperset(indices) if llamagen else os.path.isfile(shard_path(args.output, shard))

    num_shards = -(-len(dataset) // args.shard_size)
    shard_indices = [range(k * args.shard_size, min(len(dataset), (k + 1) * args.shard_size))
                     for k in range(num_shards)]
    mine = [k for k in range(env.rank, num_shards, env.world_size) if not done(k, shard_indices[k])]
    for shard in tqdm(mine, desc=f"extract {args.split} (rank {env.rank})", disable=not env.is_main):
        indices = shard_indices[shard]
        codes, labels = encode_shard(model, dataset, indices, args.batch_size, flip, env.device, args.num_workers)
        if llamagen:
            write_image_codes(folders, np.asarray(indices), codes, labels)
        else:
            write_shard(args.output, shard, codes, labels, np.asarray(indices))
    dist.barrier()
    if env.is_main and llamagen:
        print(f"{len(dataset)} images encoded into {folders.codes} and {folders.labels}")
    elif env.is_main:
        write_meta(args.output, {"tokenizer": os.path.abspath(args.tokenizer), "split": args.split,
                                 "num_images": len(dataset), "num_shards": num_shards, "shard_size": args.shard_size,
                                 "kind": model.kind, "token_shape": list(model.token_shape),
                                 **({"code_shape": list(model.code_shape), "vocab_size": model.vocab_size}
                                    if model.kind == "discrete" else {"scale_factor": model.scale_factor}),
                                 "augmentations": list(TEN_CROP_VIEWS) if args.ten_crop
                                 else ["none", "flip"] if flip else ["none"]})
        print(f"{len(dataset)} images encoded into {num_shards} shard(s) in {args.output}")
    dist.cleanup()


if __name__ == "__main__":
    main()
