"""MAR: masked autoregression over continuous KL-16 VAE latents with a per-token diffusion loss."""
