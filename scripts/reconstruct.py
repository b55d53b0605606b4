"""Reconstruct every image of a folder with any tokenizer checkpoint (ours or official).

    python scripts/reconstruct.py --ckpt results/rqvae/last.pt --input photos/ --output recon/
    python scripts/reconstruct.py --ckpt ffhq/stage1/model.pt --input photos/ --output recon/   # config.yaml beside

Images are resized (short side) and center-cropped to the model's resolution; reconstructions
keep the input file names (as PNG) and `grid.png` shows inputs above reconstructions.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common.data import build_transform, list_images, save_image_grid, to_uint8  # noqa: E402
from common.dist import resolve_device  # noqa: E402
from common.errors import DataError, cli_entry  # noqa: E402
from common.flags import at_least  # noqa: E402
from common.paths import check_output_dir  # noqa: E402
from methods import load_tokenizer  # noqa: E402


def read_images(folder: str, resolution: int) -> tuple[list[str], torch.Tensor]:
    """All images of `folder` as one [-1, 1] batch at the model's resolution; any unreadable file is an error."""
    if not os.path.isdir(folder):
        raise DataError(f"--input {folder}: no such folder")
    paths = list_images(folder)
    if not paths:
        raise DataError(f"--input {folder}: no images (.png, .jpg, .jpeg, .bmp, .webp) in this folder")
    transform = build_transform("imagenet", resolution, train=False)  # Resize(short side) + CenterCrop
    images, unreadable = [], []
    for path in paths:
        try:
            with Image.open(path) as file:
                images.append(transform(file.convert("RGB")))
        except OSError:
            unreadable.append(os.path.relpath(path, folder))
    if unreadable:
        shown = ", ".join(unreadable[:5]) + (" ..." if len(unreadable) > 5 else "")
        raise DataError(f"--input {folder}: {len(unreadable)} unreadable image(s): {shown}; remove or fix them")
    return paths, torch.stack(images)


@cli_entry
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="tokenizer checkpoint: ours, an official RQ-VAE .pt, ...")
    parser.add_argument("--config", default=None, help="config of an official checkpoint that does not sit beside it")
    parser.add_argument("--input", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--output", required=True, help="folder for the reconstructions and grid.png")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=at_least(1), default=16)
    args = parser.parse_args(argv)
    check_output_dir(args.output, "--output")

    device = resolve_device(args.device)
    model, _ = load_tokenizer(args.ckpt, args.config, map_location="cpu")
    model = model.to(device)
    paths, images = read_images(args.input, model.image_size)

    reconstructions = []
    with torch.no_grad():
        for start in tqdm(range(0, len(images), args.batch_size), desc="reconstruct", unit="batch"):
            batch = images[start:start + args.batch_size].to(device)
            reconstructions.append(model.reconstruct(batch)[0].clamp(-1, 1).cpu())
    reconstructions = torch.cat(reconstructions)

    for path, pixels in zip(paths, to_uint8(reconstructions)):
        relative = os.path.splitext(os.path.relpath(path, args.input))[0] + ".png"
        target = os.path.join(args.output, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        Image.fromarray(pixels.numpy()).save(target)
    shown = min(len(images), 16)
    save_image_grid(torch.cat([images[:shown], reconstructions[:shown]]), os.path.join(args.output, "grid.png"),
                    nrow=shown)
    print(f"{len(paths)} reconstructions and grid.png written to {args.output}")


if __name__ == "__main__":
    main()
