"""Train (or evaluate) any stage-1 tokenizer from a YAML config.

    python main_stage1.py -m configs/shapes/stage1/rqvae.yaml -r results [key=value ...]
    torchrun --nproc_per_node=8 main_stage1.py -m configs/ffhq/stage1/ffhq256-rqvae-8x8x4.yaml -r results
    python main_stage1.py -m CONFIG -r results --resume              # continue results/<config stem>/last.pt
    python main_stage1.py -m CONFIG -r results -l official/model.pt  # fine-tune from a checkpoint
    python main_stage1.py -m imagenet_lfqgan_256_L.yaml -r results -l imagenet_256_L.ckpt  # official YAML and .ckpt
    python main_stage1.py -m CONFIG -r results -l CKPT --eval        # losses and codebook usage, no training
"""
from __future__ import annotations

from common.checkpoint import load_file, strict_load
from common.config import read_yaml
from common.data import build_dataset_from_config
from common.errors import ConfigError, cli_entry
from common.launch import resolve_config, run_training, training_parser
from common.weights import resolve_checkpoint
from methods import stage1_config_data, stage1_starting_weights, stage1_type


def load_weights(task, path: str, use_ema: bool = True) -> None:
    """Fine-tuning start: model weights (and the discriminator when present) from ours or an official file;
    the task's EMA copies, if any, restart from them. `path` may be a release name."""
    model_state, disc_state = stage1_starting_weights(load_file(resolve_checkpoint(path).path), path, task.model,
                                                      use_ema)
    strict_load(task.model, model_state, path)
    if disc_state and hasattr(task, "discriminator"):
        strict_load(task.discriminator, disc_state, path)
    if hasattr(task, "restart_ema"):
        task.restart_ema()


@cli_entry
def main(argv=None) -> None:
    parser = training_parser(__doc__)
    parser.add_argument("--vgg-weights", default=None, help="local vgg16-397923af.pth for LPIPS")
    parser.add_argument("--load-raw", action="store_true",
                        help="with -l: start from the raw last-step weights, not the checkpoint's EMA weights")
    args, extra = parser.parse_known_args(argv)
    raw = stage1_config_data(read_yaml(args.model_config), args.model_config)
    tokenizer_type = stage1_type(raw, args.model_config)
    config = resolve_config(args, extra, raw, tokenizer_type.schema)
    if config.get_path("optimizer.grad_accm_steps", 1) != 1:
        raise ConfigError(f"{args.model_config}: optimizer.grad_accm_steps: tokenizers take one optimizer step per "
                          "batch; set it to 1 and raise experiment.batch_size or the number of processes instead")
    run_training(
        args, config, tokenizer_type.arch_type,
        build_datasets=lambda: (build_dataset_from_config(config["dataset"], "train"),
                                build_dataset_from_config(config["dataset"], "val")),
        build_task=lambda env, steps: tokenizer_type.task(config, env, steps, args.vgg_weights),
        load_weights=lambda task, path: load_weights(task, path, use_ema=not args.load_raw))


if __name__ == "__main__":
    main()
