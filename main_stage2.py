"""Train (or evaluate) a stage-2 prior on the codes of a frozen stage-1 tokenizer.

    python main_stage2.py -m configs/shapes/stage2/rqtransformer.yaml -r results -v results/rqvae/last.pt
    torchrun --nproc_per_node=8 main_stage2.py -m configs/ffhq/stage2/ffhq256-rqtransformer-8x8x4-350M.yaml \\
        -r results -v ffhq256/stage1/model.pt
    python main_stage2.py -m CONFIG -r results -v STAGE1 --resume
    python main_stage2.py -m CONFIG -r results -v STAGE1 -l ffhq256/stage2/model.pt   # start from official weights
    torchrun --nproc_per_node=8 main_stage2.py -m configs/imagenet/stage2/npp-gpt-B-256.yaml -r results \\
        -v vq_ds16_c2i.pt codes.train=codes/imagenet256-train                            # next-patch prediction

The prior is the config's `arch.type` (rq-transformer, llamagen-gpt). The stage-1 checkpoint comes
from -v/--vqvae or the config's `vqvae.ckpt`. Images are encoded on the fly unless `codes.train`
names shards written by scripts/extract_codes.py.
"""
from __future__ import annotations

from common.checkpoint import strict_load
from common.codes import CodesDataset
from common.config import read_yaml
from common.data import build_dataset_from_config
from common.errors import ConfigError, cli_entry
from common.launch import resolve_config, run_training, training_parser
from methods import load_tokenizer, stage2_method


def build_datasets(config):
    codes = config["codes"]
    if codes["train"]:
        if (config.get("loss") or {}).get("type") == "soft_target_cross_entropy":
            raise ConfigError("codes.train: soft targets need the images; use loss.type=cross_entropy with "
                              "extracted codes, or train on images")
        return CodesDataset(codes["train"], config["seed"]), (CodesDataset(codes["val"]) if codes["val"] else None)
    return (build_dataset_from_config(config["dataset"], "train"), build_dataset_from_config(config["dataset"], "val"))


@cli_entry
def main(argv=None) -> None:
    parser = training_parser(__doc__)
    parser.add_argument("-v", "--vqvae", default=None, help="stage-1 checkpoint (default: the config's vqvae.ckpt)")
    args, extra = parser.parse_known_args(argv)
    raw = read_yaml(args.model_config)
    method = stage2_method(raw, args.model_config)
    config = resolve_config(args, extra, raw, method.schema)
    vqvae_path = args.vqvae or config["vqvae"]["ckpt"]
    if not vqvae_path:
        raise ConfigError(f"{args.model_config}: no stage-1 checkpoint; pass -v STAGE1 or set vqvae.ckpt")
    tokenizer, _ = load_tokenizer(vqvae_path)
    config["arch"] = method.resolve_arch(config, tokenizer, args.model_config)
    config["vqvae"]["ckpt"] = vqvae_path
    run_training(args, config, method.name, build_datasets=lambda: build_datasets(config),
                 build_task=lambda env, steps: method.task(config, env, steps, tokenizer),
                 load_weights=lambda task, path: strict_load(task.model, method.starting_state(path, task.model), path))


if __name__ == "__main__":
    main()
