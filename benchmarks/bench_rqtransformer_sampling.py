"""RQ-Transformer sampling speed: KV-cached against uncached (a full forward pass per code).

    python benchmarks/bench_rqtransformer_sampling.py [--batch-size 64] [--device cpu|cuda] [--threads 2]

A tiny random prior (width 128, 4 spatial + 2 depth layers, 2048 codes) samples 8x8x4 codes,
i.e. 256 steps per batch, with top-k 250 / top-p 1.0 (the official FFHQ setting). Both paths
draw the same codes from the same seed; the table says how much the cache saves.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.cached_vs_uncached import compare  # noqa: E402
from rqvae.transformer import RQTransformer  # noqa: E402

TINY_ARCH = {
    "vocab_size": 2048, "block_size": [8, 8, 4], "embed_dim": 128, "input_embed_dim": 64, "vocab_size_cond": 1,
    "input_emb_vqvae": True, "head_emb_vqvae": True, "cumsum_depth_ctx": True, "shared_tok_emb": True,
    "shared_cls_emb": True, "body": {"n_layer": 4, "block": {"n_head": 4}},
    "head": {"n_layer": 2, "block": {"n_head": 4}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads on CPU (1 is fastest for this small model on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = RQTransformer.from_config(TINY_ARCH).to(device).eval()
    model.codebook.normal_()

    def sample(batch_size: int, cached: bool) -> torch.Tensor:
        cond = torch.zeros(batch_size, dtype=torch.long, device=device)
        generator = torch.Generator(device).manual_seed(0)
        return model.generate(cond, top_k=250, top_p=1.0, cached=cached, generator=generator)

    sample(2, True)  # warm-up
    compare(lambda cached: sample(args.batch_size, cached), args.batch_size, device,
            "RQ-Transformer sampling, 8x8x4 codes")


if __name__ == "__main__":
    main()
