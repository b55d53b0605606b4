"""Cache the KL-VAE latents of a training set in MAR's official layout, to train from with `mar.cache.CachedLatents`.

    python main_cache.py --img_size 256 --vae_path pretrained_models/vae/kl16.ckpt --vae_embed_dim 16 \\
        --batch_size 128 --data_path ${IMAGENET_PATH} --cached_path ${CACHED_PATH}
    torchrun --nproc_per_node=8 main_cache.py ...same flags...        # each process caches its own share
    python main_cache.py --dataset shapes --num_images 2048 --img_size 32 \\
        --vae_path tests/data/mar/vae_tiny.ckpt --vae_embed_dim 8 --cached_path cache/shapes --device cpu

Every image of `<data_path>/train/<class>/` gets ADM's centre crop to `--img_size` (no random flip)
and becomes `<cached_path>/<class>/<file name>.npz` (`n01440764/n01440764_10026.JPEG.npz`) with
`moments` and `moments_flip`: the VAE's posterior moments (2C, h, w), float32, of the image and of
its mirror image. Files already there are skipped, so rerunning the same command resumes an
interrupted run (with any number of processes); a file appears whole or not at all. An unreadable
image is reported, skipped and counted, and tried again by the next run.

`--dataset shapes` caches the built-in drawn shapes instead of a folder, so the pipeline runs with
no data: `--num_images` of them (default 10000) drawn at `--img_size` from `--seed`, in ten class
folders `00_circle` ... `09_crescent` (sorted, they give the shapes' labels), files `000000.npz` ...

`--vae_path` takes the released kl16.ckpt (or any file of its layout: the architecture is read off
the weights) or a kl-vae checkpoint of ours; `--vae_config` gives an official file a config of ours
(`arch.type: kl-vae`), e.g. for another image size. `--vae_embed_dim` must be the VAE's latent
channels. Unlike the official script, `--device` defaults to auto (CUDA when present, else CPU),
and the last batch is not padded, so no file is written twice.
"""
from __future__ import annotations

import argparse

import torch

from common import dist
from common.errors import CheckpointError, DataError, UserError, cli_entry
from common.flags import at_least
from common.tokenizer import ContinuousTokenizer
from mar.cache import FolderImages, ShapeImages, cache_latents
from methods import load_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=128, help="images per process and step")
    parser.add_argument("--img_size", type=int, default=256, help="images are centre-cropped to this size")
    parser.add_argument("--vae_path", default="pretrained_models/vae/kl16.ckpt")
    parser.add_argument("--vae_embed_dim", type=int, default=16, help="latent channels C of the VAE")
    parser.add_argument("--vae_config", default=None, help="a kl-vae config of ours for an official VAE file")
    parser.add_argument("--dataset", choices=("imagenet", "shapes"), default="imagenet",
                        help="imagenet: the folder <data_path>/train/<class>/<images>; shapes: the built-in data")
    parser.add_argument("--data_path", default="./data/imagenet")
    parser.add_argument("--num_images", type=int, default=None, help="shapes only: how many (default 10000)")
    parser.add_argument("--cached_path", default="", help="the folder the cache files are written to")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="shapes only: the seed they are drawn from")
    parser.add_argument("--num_workers", type=at_least(0), default=10)
    parser.add_argument("--pin_mem", action="store_true", help="pin CPU memory for faster copies to the GPU")
    parser.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if not args.cached_path:
        raise UserError("--cached_path is required: the folder the cache files are written to")
    for flag in ("batch_size", "img_size", "vae_embed_dim"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be a positive int, got {getattr(args, flag)}")
    if args.num_images is not None and (args.dataset != "shapes" or args.num_images < 1):
        raise UserError("--num_images must be a positive int, and is for --dataset shapes only (a folder is cached "
                        "whole: its class folders give the labels)")


def load_vae(args: argparse.Namespace) -> ContinuousTokenizer:
    """The KL-VAE of --vae_path, checked against --vae_embed_dim and --img_size."""
    vae, _ = load_tokenizer(args.vae_path, args.vae_config)
    if vae.kind != "continuous":
        raise CheckpointError(f"{args.vae_path}: a {type(vae).__name__} ({vae.kind} tokens), not a KL-VAE; "
                              "--vae_path takes kl16.ckpt or a kl-vae checkpoint of ours")
    if vae.channels != args.vae_embed_dim:
        raise UserError(f"--vae_embed_dim {args.vae_embed_dim} does not match {args.vae_path}, whose latents have "
                        f"{vae.channels} channels; pass --vae_embed_dim {vae.channels}")
    if args.img_size % vae.downsample_factor:
        raise DataError(f"--img_size {args.img_size} is not a multiple of the VAE's downsampling factor "
                        f"{vae.downsample_factor}")
    return vae


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_args(args)
    env = dist.setup(args.device)
    vae = load_vae(args).to(env.device)
    if args.dataset == "shapes":
        images = ShapeImages(args.img_size, args.num_images, args.seed)
    else:
        images = FolderImages(args.data_path, args.img_size)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input size throughout
    report = cache_latents(vae, images, args.cached_path, args.batch_size, env.device, env.rank, env.world_size,
                           args.num_workers, pin_memory=args.pin_mem and env.device.type == "cuda")
    if env.is_main:
        print(f"{report.written} images cached in {args.cached_path} ({report.existing} cached before, "
              f"{report.unreadable} unreadable skipped)")
    dist.cleanup()


if __name__ == "__main__":
    main()
