"""Sample images from a stage-2 prior (ours or official) and its stage-1 tokenizer.

    python scripts/sample.py -v results/rqvae/last.pt -a results/rqtransformer/last.pt --classes 2 7 -n 4 \\
        --output samples/
    python scripts/sample.py -v ffhq/stage1/model.pt -a ffhq/stage2/model.pt -n 16 --output samples/
    python scripts/sample.py -v in256/stage1/model.pt -a in256/stage2/model.pt --classes 0 13 --top-k 1 \\
        --output greedy/        # top-k 1: the official sampler's greedy codes
    python scripts/sample.py -v results/rqvae/last.pt -a results/rqtransformer-t2i/last.pt -n 4 \\
        --prompt "a red star on a blue background, top left" --prompt "a white ring on a green background, center" \\
        --output samples/

With --classes, -n images of each listed class (default 1), class by class in the order given, and
one row of grid.png per class. Without it, -n images (default 16): an unconditional prior's, or a
class-conditional prior's cycling through classes 0, 1, 2, ... The prior's sampling knobs are flags or
key=value arguments and default to the checkpoint's (official: the release's settings; ours:
`experiment.sample`). Writes 00000.png, ..., grid.png and the tokens: codes.npy (int64, N x h x w [x D],
in the prior's layout) of a discrete tokenizer, latents.npy (float32, N x C x h x w) of a continuous one.
Batch g draws from a generator seeded by (--seed, g), as in main_sampling_fid.py.

A text-conditioned prior takes --prompt TEXT (repeatable): -n images of each prompt (default 1), one
row of grid.png per prompt with the prompt under each image, and captions.jsonl (the file and caption
of every image). Prompts longer than the prior's text context are truncated (with a note); official
releases find their vocabulary with --text-tokenizer DIR or in torch's hub cache.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common.caption_grid import captioned_grid  # noqa: E402
from common.captions import CAPTIONS_FILE, write_captions_file  # noqa: E402
from common.data import save_image_grid, to_uint8  # noqa: E402
from common.dist import resolve_device  # noqa: E402
from common.errors import ConfigError, DataError, cli_entry  # noqa: E402
from common.paths import check_output_dir  # noqa: E402
from common.sampler import parse_sampling_args, sampling_parser  # noqa: E402
from common.text_tokenizer import prompt_ids  # noqa: E402
from methods import load_sampler, sampling_knob_schemas  # noqa: E402

DEFAULT_SAMPLES = 16  # without --classes


def requested_labels(classes: list[int] | None, n: int | None, num_classes: int) -> torch.Tensor:
    """Class labels of the images to draw, in output order."""
    if n is not None and n < 1:
        raise ConfigError(f"-n must be at least 1, got {n}")
    if classes is None:
        return torch.arange(n or DEFAULT_SAMPLES) % num_classes
    if num_classes == 1 and any(classes):
        raise DataError(f"--classes {' '.join(map(str, classes))}: this prior is unconditional; omit --classes")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise DataError(f"--classes {bad[0]}: class labels of this prior lie in [0, {num_classes})")
    return torch.tensor(classes).repeat_interleave(n or 1)


def requested_conditions(args: argparse.Namespace, prior: torch.nn.Module) -> tuple[torch.Tensor, list[str] | None]:
    """(the conditions of the images to draw, in output order; their captions, for a text prior)."""
    text_tokenizer = getattr(prior, "text_tokenizer", None)
    if text_tokenizer is None:
        if args.prompt:
            raise DataError("--prompt: this prior is not text-conditioned; use --classes, or a text-to-image prior")
        return requested_labels(args.classes, args.n_samples, prior.num_classes), None
    if args.classes is not None or not args.prompt:
        raise DataError(f"{args.model_ar_path}: a text-conditioned prior; give --prompt TEXT (repeatable) instead "
                        "of classes")
    if args.n_samples is not None and args.n_samples < 1:
        raise ConfigError(f"-n must be at least 1, got {args.n_samples}")
    per_prompt = args.n_samples or 1
    ids = prompt_ids(text_tokenizer, args.prompt, [f"--prompt {i + 1}" for i in range(len(args.prompt))])
    return ids.repeat_interleave(per_prompt, dim=0), [p for p in args.prompt for _ in range(per_prompt)]


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = sampling_parser(__doc__, sampling_knob_schemas())
    parser.set_defaults(batch_size=32)
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="class labels to sample")
    parser.add_argument("--prompt", action="append", default=[], help="text-to-image: a caption (repeatable)")
    parser.add_argument("-n", "--n-samples", type=int, default=None,
                        help=f"images per listed class or prompt (default 1), or in all without them "
                             f"(default {DEFAULT_SAMPLES})")
    parser.add_argument("--output", required=True, help="folder for the PNGs, grid.png and codes.npy")
    args, assignments = parse_sampling_args(parser, argv)
    check_output_dir(args.output, "--output")

    device = resolve_device(args.device)
    sampler = load_sampler(args, assignments, device)
    labels, captions = requested_conditions(args, sampler.prior)
    print(f"sampling {len(labels)} images with {sampler.describe()}")

    codes, images = [], []
    for index, start in enumerate(tqdm(range(0, len(labels), args.batch_size), desc="sampling", unit="batch")):
        batch_codes, batch_images = sampler.generate(labels[start:start + args.batch_size], args.seed, index)
        codes.append(batch_codes.cpu())
        images.append(batch_images.cpu())
    codes, images = torch.cat(codes), torch.cat(images)

    os.makedirs(args.output, exist_ok=True)
    for index, pixels in enumerate(to_uint8(images)):
        Image.fromarray(pixels.numpy()).save(os.path.join(args.output, f"{index:05d}.png"))
    per_row = args.n_samples if (args.classes or captions) and args.n_samples and args.n_samples > 1 else None
    if captions is None:
        save_image_grid(images, os.path.join(args.output, "grid.png"), nrow=per_row)
    else:
        captioned_grid(to_uint8(images).numpy(), captions, per_row or 8).save(os.path.join(args.output, "grid.png"))
        write_captions_file(os.path.join(args.output, CAPTIONS_FILE), captions)
    tokens_file = "latents.npy" if codes.is_floating_point() else "codes.npy"
    np.save(os.path.join(args.output, tokens_file),
            codes.float().numpy() if codes.is_floating_point() else codes.numpy().astype(np.int64))
    print(f"{len(labels)} images, grid.png and {tokens_file} written to {args.output}")


if __name__ == "__main__":
    main()
