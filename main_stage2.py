"""Train (or evaluate) a stage-2 prior on the tokens of a frozen stage-1 tokenizer.

    python main_stage2.py -m configs/shapes/stage2/rqtransformer.yaml -r results -v results/rqvae/last.pt
    torchrun --nproc_per_node=8 main_stage2.py -m configs/ffhq/stage2/ffhq256-rqtransformer-8x8x4-350M.yaml \\
        -r results -v ffhq256/stage1/model.pt
    python main_stage2.py -m CONFIG -r results -v STAGE1 --resume
    python main_stage2.py -m CONFIG -r results -v STAGE1 -l ffhq256/stage2/model.pt   # start from official weights
    torchrun --nproc_per_node=8 main_stage2.py -m configs/imagenet/stage2/npp-gpt-B-256.yaml -r results \\
        -v vq_ds16_c2i.pt codes.train=codes/imagenet256-train                            # next-patch prediction

The prior is the config's `arch.type` (rq-transformer, llamagen-gpt). The tokenizer checkpoint comes
from -v/--tokenizer or the config's `tokenizer.ckpt` (official RQ configs: `vqvae.ckpt`). Images are
encoded on the fly unless `codes.train` names shards written by scripts/extract_codes.py or a folder of
LlamaGen's code files (its `extract_codes_c2i.py`, or ours with `--layout llamagen`).
"""
from __future__ import annotations

from common.checkpoint import strict_load
from common.config import read_yaml
from common.data import build_dataset_from_config
from common.errors import ConfigError, cli_entry
from common.launch import resolve_config, run_training, training_parser
from common.llamagen_codes import open_codes
from methods import load_tokenizer, stage2_starting_weights, stage2_type


def build_datasets(config, tokenizer):
    """Cached tokens (checked against the tokenizer once, here) or images."""
    codes = config["codes"]
    if not codes["train"]:
        return (build_dataset_from_config(config["dataset"], "train"),
                build_dataset_from_config(config["dataset"], "val"))
    resolution = config["dataset"]["resolution"]
    return (open_codes(codes["train"], config["seed"], tokenizer, resolution),
            open_codes(codes["val"], 0, tokenizer, resolution) if codes["val"] else None)


@cli_entry
def main(argv=None) -> None:
    parser = training_parser(__doc__)
    parser.add_argument("-v", "--tokenizer", "--vqvae", dest="tokenizer", default=None,
                        help="stage-1 tokenizer checkpoint (default: the config's tokenizer.ckpt or vqvae.ckpt)")
    parser.add_argument("--config", default=None,
                        help="the YAML an official Open-MAGVIT2 .ckpt given with -v was trained with")
    args, extra = parser.parse_known_args(argv)
    raw = read_yaml(args.model_config)
    prior_type = stage2_type(raw, args.model_config)
    config = resolve_config(args, extra, raw, prior_type.schema)
    tokenizer_path = args.tokenizer or config["tokenizer"]["ckpt"] or config["vqvae"]["ckpt"]
    if not tokenizer_path:
        raise ConfigError(f"{args.model_config}: no stage-1 checkpoint; pass -v STAGE1 or set tokenizer.ckpt")
    tokenizer, _ = load_tokenizer(tokenizer_path, args.config)
    config = prior_type.prepare(config, tokenizer, args.model_config)
    config["tokenizer"]["ckpt"] = config["vqvae"]["ckpt"] = tokenizer_path
    run_training(args, config, prior_type.arch_type, build_datasets=lambda: build_datasets(config, tokenizer),
                 build_task=lambda env, steps: prior_type.task(config, env, steps, tokenizer),
                 load_weights=lambda task, path: strict_load(task.model, stage2_starting_weights(path, task.model),
                                                             path))


if __name__ == "__main__":
    main()
