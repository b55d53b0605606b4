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
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rqvae.transformer import RQTransformer  # noqa: E402

TINY_ARCH = {
    "vocab_size": 2048, "block_size": [8, 8, 4], "embed_dim": 128, "input_embed_dim": 64, "vocab_size_cond": 1,
    "input_emb_vqvae": True, "head_emb_vqvae": True, "cumsum_depth_ctx": True, "shared_tok_emb": True,
    "shared_cls_emb": True, "body": {"n_layer": 4, "block": {"n_head": 4}},
    "head": {"n_layer": 2, "block": {"n_head": 4}},
}


def time_sampling(model: RQTransformer, batch_size: int, cached: bool, device: torch.device
                  ) -> tuple[float, torch.Tensor]:
    cond = torch.zeros(batch_size, dtype=torch.long, device=device)
    generator = torch.Generator(device).manual_seed(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    codes = model.generate(cond, top_k=250, top_p=1.0, cached=cached, generator=generator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, codes


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
    time_sampling(model, 2, cached=True, device=device)  # warm-up

    results = {cached: time_sampling(model, args.batch_size, cached, device) for cached in (True, False)}
    same_codes = torch.equal(results[True][1], results[False][1])
    print(f"RQ-Transformer sampling, 8x8x4 codes, batch {args.batch_size}, {device}, "
          f"{torch.get_num_threads()} threads; same codes: {same_codes}")
    print(f"{'path':>9} | {'s / batch':>9} | {'images / s':>10} | {'ms / sample':>11} | {'speed-up':>8}")
    print("-" * 60)
    for cached, label in ((False, "uncached"), (True, "cached")):
        seconds = results[cached][0]
        print(f"{label:>9} | {seconds:>9.2f} | {args.batch_size / seconds:>10.1f} | "
              f"{1000 * seconds / args.batch_size:>11.2f} | {results[False][0] / seconds:>7.1f}x")


if __name__ == "__main__":
    main()
