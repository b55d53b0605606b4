"""Reconstruction metrics of any tokenizer over a dataset split: rFID, PSNR, SSIM, LPIPS, codebook usage
(where there is a codebook; a KL VAE is scored on its decoded posterior means).

    python compute_rfid.py --vqvae ffhq/stage1/model.pt --split val --data-root data/ffhq \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth --vgg-weights vgg16-397923af.pth
    torchrun --nproc_per_node=8 compute_rfid.py --vqvae results/rqvae/last.pt --batch-size 100

Both sides are computed on the fly: Inception features of the originals and of their
reconstructions (no statistics files). Results are printed and written to `rfid.log` and
`rfid.json` beside the checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from common import dist
from common.data import build_dataset_from_config, build_loader
from common.errors import UserError, cli_entry
from common.flags import at_least
from common.losses import LPIPS
from common.metrics import find_inception_weights, load_inception, reconstruction_metrics
from common.paths import check_output_dir
from common.weights import resolve_checkpoint
from methods import load_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vqvae", "--tokenizer", dest="vqvae", required=True,
                        help="tokenizer checkpoint (ours or official; any kind)")
    parser.add_argument("--config", default=None, help="config of an official checkpoint that does not sit beside it")
    parser.add_argument("--split", default="val", help="val (default) or train")
    parser.add_argument("--batch-size", type=at_least(1), default=100, help="per process")
    parser.add_argument("--data-root", default=None, help="dataset folder (default: the config's dataset.root)")
    parser.add_argument("--num-images", type=at_least(1), default=None,
                        help="score an evenly spaced subset of this size")
    parser.add_argument("--inception-weights", default=None, help="weights-inception-2015-12-05-6726825d.pth")
    parser.add_argument("--vgg-weights", default=None, help="vgg16-397923af.pth for LPIPS (skipped with --no-lpips)")
    parser.add_argument("--no-lpips", action="store_true", help="skip LPIPS (no VGG weights needed)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=at_least(0), default=4)
    return parser.parse_args(argv)


@cli_entry
def main(argv=None) -> dict:
    args = parse_args(argv)
    args.vqvae, args.config = resolve_checkpoint(args.vqvae, args.config)  # a release name: rfid.json goes beside it
    if args.split not in ("val", "train"):
        raise UserError(f"--split must be val or train, got {args.split!r}")
    check_output_dir(os.path.dirname(os.path.abspath(args.vqvae)), "the folder of --vqvae (rfid.json goes there)")
    env = dist.setup(args.device)
    model, config = load_tokenizer(args.vqvae, args.config)
    model = model.to(env.device)
    inception = load_inception(find_inception_weights(args.inception_weights), env.device)
    lpips = None if args.no_lpips else LPIPS(args.vgg_weights).to(env.device)
    dataset_cfg = dict(config["dataset"])
    if args.data_root:
        dataset_cfg["root"] = args.data_root
    if args.num_images:
        dataset_cfg["num_samples"] = args.num_images
    dataset = build_dataset_from_config(dataset_cfg, args.split)
    loader = build_loader(dataset, args.batch_size, env.world_size, env.rank, shuffle=False,
                          num_workers=args.num_workers, drop_last=False)

    results = reconstruction_metrics(model, loader, env, inception, lpips, desc=f"rFID {args.split}")
    results.update(checkpoint=os.path.abspath(args.vqvae), split=args.split)

    if env.is_main:
        lines = [f"{k}: {v:.6g}" if isinstance(v, float) else f"{k}: {v}" for k, v in results.items()]
        print("\n".join(lines))
        directory = os.path.dirname(os.path.abspath(args.vqvae))
        with open(os.path.join(directory, "rfid.log"), "a") as f:
            f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] " + ", ".join(lines) + "\n")
        with open(os.path.join(directory, "rfid.json"), "w") as f:
            json.dump(results, f, indent=2)
    dist.cleanup()
    return results


if __name__ == "__main__":
    main()
