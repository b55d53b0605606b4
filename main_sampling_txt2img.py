"""Text-to-image sampling: one image per caption from a text-conditioned prior (ours or an official release).

    python main_sampling_txt2img.py -v cc3m/stage1/model.pt -a cc3m/stage2/model.pt --dataset cc3m \\
        --text-tokenizer rq-vae-transformer/rqvae/txtimg_datasets/tokenizers/pretrained --save-dir results
    torchrun --nproc_per_node=8 main_sampling_txt2img.py -v cc3m_cc12m_yfcc/stage1/model.pt \\
        -a cc3m_cc12m_yfcc/stage2/model.pt --dataset coco_2014val --top-k 1024 --top-p 0.95 -bs 50
    python main_sampling_txt2img.py -v results/rqvae/last.pt -a results/rqtransformer-t2i/last.pt \\
        --prompt "a red star on a blue background, top left" --prompt "a white ring on a green background, center"
    python main_sampling_txt2img.py -v STAGE1 -a STAGE2 --prompts prompts.txt

The official flags (-v -a --dataset -t --top-k --top-p -bs --ema --save-dir --seed, --no-tensorboard,
--no-stats-saving) mean what they mean there, except that EMA weights are used whenever the checkpoint
has them (--no-ema: the raw ones) and that seeds are reproducible: batch g (of -bs images, counted over
all processes) draws from its own generator seeded by (--seed, g), whatever the number of processes.
Unset knobs take the checkpoint's defaults (official releases: their `sampling` section).

Captions: those of --prompts FILE (one per line, or file<TAB>caption lines) and of each --prompt, in
that order; without them the validation captions of --dataset: cc3m (<data root>/val_list.txt, data root
data/cc3m) or coco_2014val (the first caption of each image in <data root>/annotations/
captions_val2014_30K_samples.json, else captions_val2014.json; data root data/coco). A caption is
truncated to the prior's text context (a note says so); an empty one is refused. The text tokenizer is
the one in our checkpoints; an official release's is the released vocabulary (--text-tokenizer DIR, or
torch's hub cache).

Results go to <save dir>/logs_fid/(valid|valid_ema)/<ckpt>_<knobs>/<timestamp>_<seed>/ as for
main_sampling_fid.py: samples/00000.png ... (image i from caption i), samples/captions.jsonl (file and
caption of every image), grid.png (the first 64 images, each above its caption) and sampling.json.
Score them with compute_metrics.py (FID against the caption set's images; CLIP score against the captions).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np
from PIL import Image

from common import dist
from common.caption_grid import captioned_grid
from common.captions import CAPTIONS_FILE, read_caption_rows, sample_file_name, write_captions_file
from common.data import caption_list
from common.errors import ConfigError, cli_entry
from common.metrics.fidelity import write_atomic
from common.paths import check_output_dir
from common.sampler import (add_official_sampling_flags, parse_sampling_args, result_dir, sample_in_shards,
                            sampling_parser)
from common.text_tokenizer import prompt_ids
from methods import load_sampler, sampling_knob_schemas

DATASETS = ("cc3m", "coco_2014val")
GRID_IMAGES = 64


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = sampling_parser(__doc__, sampling_knob_schemas())
    parser.add_argument("--dataset", choices=DATASETS, default=None,
                        help="sample the validation captions of this caption set (default cc3m, without prompts)")
    parser.add_argument("--data-root", default=None, help="the caption set's folder (default data/cc3m, data/coco)")
    parser.add_argument("--prompt", action="append", default=[], help="a caption to sample (repeatable)")
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="captions to sample, one per line (or file<TAB>caption lines)")
    parser.add_argument("--save-dir", default=None, help="results under SAVE_DIR/<grandparent>_<parent of -a>")
    parser.add_argument("--no-stats-saving", action="store_true",
                        help="accepted for compatibility (scores come from compute_metrics.py)")
    add_official_sampling_flags(parser)
    return parse_sampling_args(parser, argv)


def requested_captions(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(captions, where each comes from, for messages): the prompts, else the --dataset's validation captions."""
    if (args.prompts or args.prompt) and (args.dataset or args.data_root):
        raise ConfigError("give captions either as --prompt / --prompts or as --dataset (and --data-root), not both")
    if args.prompts or args.prompt:
        from_file = [caption for _, caption in read_caption_rows(args.prompts)] if args.prompts else []
        names = [f"{args.prompts}, caption {i}" for i in range(len(from_file))]
        return from_file + args.prompt, names + [f"--prompt {i + 1}" for i in range(len(args.prompt))]
    dataset = args.dataset or DATASETS[0]
    captions = caption_list({"type": dataset, "root": args.data_root}, "val")
    return captions, [f"{dataset} caption {i}" for i in range(len(captions))]


@cli_entry
def main(argv: list[str] | None = None) -> str | None:
    """Sample an image per caption and save them; on rank 0 return the result folder."""
    args, assignments = parse_args(argv)
    check_output_dir(args.save_dir or os.path.dirname(os.path.abspath(args.model_ar_path)),
                     "--save-dir" if args.save_dir else "the folder of -a (results go there without --save-dir)")
    captions, names = requested_captions(args)
    with dist.session(args.device) as env:
        return run(args, assignments, env, captions, names)


def run(args: argparse.Namespace, assignments: list[str], env: dist.DistEnv, captions: list[str],
        names: list[str]) -> str | None:
    """Check the request, then every rank samples its share; rank 0 writes the images, captions and grid."""
    sampler = load_sampler(args, assignments, env.device)
    text_tokenizer = getattr(sampler.prior, "text_tokenizer", None)
    if text_tokenizer is None:
        raise ConfigError(f"{args.model_ar_path}: not a text-conditioned prior; sample it with main_sampling_fid.py "
                          "or scripts/sample.py")
    ids = prompt_ids(text_tokenizer, captions, names, notes=env.is_main)
    out_dir = dist.broadcast_object(result_dir(args, sampler) if env.is_main else None)
    if env.is_main:
        print(f"sampling {len(captions)} images with {sampler.describe()}, {env.world_size} process(es) -> {out_dir}")

    start, grid_pixels = time.perf_counter(), []
    for first, _, pixels in sample_in_shards(sampler, ids, args.batch_size, args.seed, env):
        if not env.is_main:
            continue
        for offset, image in enumerate(pixels):
            Image.fromarray(image).save(os.path.join(out_dir, "samples", sample_file_name(first + offset)))
        grid_pixels.extend(pixels[:GRID_IMAGES - len(grid_pixels)])
    seconds = time.perf_counter() - start
    if not env.is_main:
        return None
    write_captions_file(os.path.join(out_dir, "samples", CAPTIONS_FILE), captions)
    captioned_grid(np.stack(grid_pixels), captions[:len(grid_pixels)]).save(os.path.join(out_dir, "grid.png"))
    source = ", ".join(filter(None, [args.prompts, "--prompt" if args.prompt else None])) or args.dataset or DATASETS[0]
    settings: dict[str, Any] = dict(num_images=len(captions), source=source,
                                    seed=args.seed, stage1=args.model_vqvae_path, stage2=args.model_ar_path,
                                    ema=sampler.use_ema, **sampler.knobs, batch_size=args.batch_size,
                                    world_size=env.world_size, sampling_seconds=round(seconds, 3))
    write_atomic(os.path.join(out_dir, "sampling.json"),
                 lambda handle: handle.write((json.dumps(settings, indent=2) + "\n").encode()))
    print(f"{len(captions)} images in {seconds:.1f} s; wrote {out_dir}")
    return out_dir


if __name__ == "__main__":
    main()
