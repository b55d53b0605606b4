"""Token caching for both kinds of tokenizer: codes stay integers, posterior moments stay float32."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import yaml

from common.data import build_dataset_from_config
from common.errors import DataError
from common.token_cache import CachedTokens, write_meta, write_shard
from common.tokenizer import DiagonalGaussian
from methods import load_tokenizer
from scripts import extract_codes
from tests.helpers import DATA

VAE = os.path.join(DATA, "mar", "vae_tiny.ckpt")
RQVAE = os.path.join(DATA, "rqvae", "stage1", "model.pt")
TINY_VAE = {"type": "kl-vae", "embed_dim": 8, "ch": 32, "ch_mult": [2, 1], "num_res_blocks": 1, "resolution": 32,
            "encoder_attn_resolutions": [16], "decoder_attn_resolutions": []}


@pytest.fixture(scope="module")
def vae_config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("vae") / "tiny.yaml"
    path.write_text(yaml.safe_dump({"dataset": {"type": "shapes", "resolution": 32, "num_samples": 6},
                                    "arch": TINY_VAE}))
    return str(path)


def test_a_continuous_tokenizer_caches_float32_moments_and_training_draws_fresh_samples(tmp_path, vae_config):
    out = tmp_path / "latents"
    extract_codes.main(["--tokenizer", VAE, "--config", vae_config, "--output", str(out), "--flip", "--shard-size",
                        "4", "--num-workers", "0", "--device", "cpu"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "continuous" and meta["token_shape"] == [8, 16, 16] and meta["num_shards"] == 2
    with np.load(out / "codes_00000.npz") as shard:
        assert set(shard.files) == {"moments", "labels", "indices"} and shard["moments"].dtype == np.float32
        assert shard["moments"].shape == (4, 2, 16, 16, 16)

    vae, _ = load_tokenizer(VAE, vae_config)
    cache = CachedTokens(str(out))
    cache.check_tokenizer(vae)
    item = cache[0]
    assert item["moments"].dtype == torch.float32 and item["moments"].shape == (16, 16, 16)
    with torch.no_grad():
        shapes = build_dataset_from_config({"type": "shapes", "resolution": 32, "num_samples": 6}, "train",
                                           augment=False)
        images = torch.stack([shapes[i]["image"] for i in range(2)])
        assert torch.allclose(cache.tokens[:2, 0], vae.encode_moments(images), atol=1e-5)
    moments = cache.tokens[:2, 0]
    first, second = vae.tokens_from_moments(moments), vae.tokens_from_moments(moments)
    assert not torch.equal(first, second)  # a fresh posterior sample each time
    assert torch.allclose(DiagonalGaussian(moments).mode() * vae.scale_factor, (first + second) / 2, atol=1.0)

    rqvae, _ = load_tokenizer(RQVAE)
    with pytest.raises(DataError, match="not what the tokenizer makes"):
        cache.check_tokenizer(rqvae)


def test_codes_keep_their_integer_type_and_are_checked_against_the_vocabulary(tmp_path):
    rqvae, _ = load_tokenizer(RQVAE)  # 8x8x3 codes of a 32-entry codebook
    codes = np.random.default_rng(0).integers(0, 32, size=(5, 1, 8, 8, 3))
    write_shard(str(tmp_path), 0, codes, np.arange(5), np.arange(5))
    write_meta(str(tmp_path), {"num_shards": 1})
    with np.load(tmp_path / "codes_00000.npz") as shard:
        assert shard["codes"].dtype == np.int16
    with pytest.MonkeyPatch.context() as patch:  # an extraction killed between writing and renaming shard 1
        patch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            write_shard(str(tmp_path), 1, codes, np.arange(5), np.arange(5, 10))
    assert len(os.listdir(tmp_path)) == 3  # the shard, meta.json and the temporary file, which is not a shard
    cache = CachedTokens(str(tmp_path))
    cache.check_tokenizer(rqvae)
    assert cache[3]["codes"].dtype == torch.int64 and torch.equal(cache[3]["codes"], torch.from_numpy(codes[3, 0]))

    codes[2, 0, 0, 0, 0] = 40  # a code outside the vocabulary: codes of another tokenizer
    write_shard(str(tmp_path), 0, codes, np.arange(5), np.arange(5))
    with pytest.raises(DataError, match=r"codes of shape \[8, 8, 3\] in \[0, 32\)"):
        CachedTokens(str(tmp_path)).check_tokenizer(rqvae)


def test_reconstruction_metrics_score_a_tokenizer_without_a_codebook(vae_config):
    from common.data import build_loader
    from common.dist import DistEnv
    from common.metrics import reconstruction_metrics

    vae, _ = load_tokenizer(VAE, vae_config)
    shapes = build_dataset_from_config({"type": "shapes", "resolution": 32, "num_samples": 6}, "val", augment=False)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    results = reconstruction_metrics(vae, build_loader(shapes, 3, shuffle=False, drop_last=False), env)
    assert set(results) == {"psnr", "ssim", "num_images"} and results["num_images"] == 6  # no codebook usage
    assert results["psnr"] > 0
