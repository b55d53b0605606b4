"""RQ-VAE (residual-quantised tokenizer) and RQ-Transformer (spatial + depth prior), Lee et al., CVPR 2022."""
