"""Train (or evaluate) any stage-1 tokenizer from a YAML config.

    python main_stage1.py -m configs/shapes/stage1/rqvae.yaml -r results [key=value ...]
    torchrun --nproc_per_node=8 main_stage1.py -m configs/ffhq/stage1/ffhq256-rqvae-8x8x4.yaml -r results
    python main_stage1.py -m CONFIG -r results --resume              # continue results/<config stem>/last.pt
    python main_stage1.py -m CONFIG -r results -l official/model.pt  # fine-tune from a checkpoint
    python main_stage1.py -m CONFIG -r results -l CKPT --eval        # losses and codebook usage, no training
"""
from __future__ import annotations

from common.checkpoint import is_our_checkpoint, load_file, strict_load
from common.config import read_yaml
from common.data import build_dataset_from_config
from common.errors import CheckpointError, cli_entry
from common.launch import resolve_config, run_training, training_parser
from methods import stage1_method


def load_weights(task, path: str) -> None:
    """Fine-tuning start: model weights (and the discriminator when present) from ours or an official file."""
    obj = load_file(path)
    if is_our_checkpoint(obj):
        model_state, disc_state = obj["model"], obj.get("discriminator")
    else:
        from rqvae import official as rqvae_official

        if not rqvae_official.is_official_rqvae_checkpoint(obj):
            raise CheckpointError(f"{path}: not a stage-1 checkpoint (ours or an official RQ-VAE .pt)")
        model_state, disc_state = obj["state_dict"], obj.get("discriminator")
    strict_load(task.model, model_state, path)
    if disc_state and hasattr(task, "discriminator"):
        strict_load(task.discriminator, disc_state, path)


@cli_entry
def main(argv=None) -> None:
    parser = training_parser(__doc__)
    parser.add_argument("--vgg-weights", default=None, help="local vgg16-397923af.pth for LPIPS")
    args, extra = parser.parse_known_args(argv)
    raw = read_yaml(args.model_config)
    method = stage1_method(raw, args.model_config)
    config = resolve_config(args, extra, raw, method.schema)
    run_training(
        args, config, method.name,
        build_datasets=lambda: (build_dataset_from_config(config["dataset"], "train"),
                                build_dataset_from_config(config["dataset"], "val")),
        build_task=lambda env, steps: method.task(config, env, steps, args.vgg_weights),
        load_weights=load_weights)


if __name__ == "__main__":
    main()
