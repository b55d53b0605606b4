"""Everything the four methods share: layers, losses, configs, data, distributed set-up, checkpoints, metrics."""
