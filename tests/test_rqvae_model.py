"""RQ-VAE model: numerics against the official code's reference vectors, codebook EMA, loading and export.

Reference data (tests/data/rqvae/) was produced by the official kakaobrain/rq-vae-transformer code
on a tiny random model: 16x16 images, 8x8x8 latents, codes 8x8x3, 32 codes, shared codebook.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from torch.testing import assert_close

from common.config import read_yaml, validate
from common.errors import CheckpointError, ConfigError, DataError
from common.layers import AttnBlock, Downsample, Upsample
from rqvae.official import (export_official_rqvae, is_official_rqvae_checkpoint, load_official_rqvae,
                            official_discriminator_state)
from rqvae.quantizer import RQBottleneck, VQEmbedding
from rqvae.schema import RQVAE_ARCH
from rqvae.vqvae import RQVAE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data", "rqvae")
CKPT = os.path.join(DATA, "stage1", "model.pt")
CONFIG = os.path.join(DATA, "stage1", "config.yaml")


def close(actual, expected):
    assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def vectors():
    return torch.load(os.path.join(DATA, "stage1_vectors.pt"), weights_only=True)


@pytest.fixture
def model():
    return load_official_rqvae(CKPT).eval()


def tiny_arch(**hparams) -> dict:
    arch = read_yaml(CONFIG)["arch"]
    arch["hparams"].update(hparams)
    return arch


def copy_official(tmp_path, state_dict=None, arch=None) -> str:
    """The official stage-1 files in tmp_path, optionally with another state dict or arch section."""
    os.makedirs(tmp_path / "stage1", exist_ok=True)
    path = str(tmp_path / "stage1" / "model.pt")
    ckpt = torch.load(CKPT, weights_only=True)
    if state_dict is not None:
        ckpt["state_dict"] = state_dict
    torch.save(ckpt, path)
    config = read_yaml(CONFIG)
    if arch is not None:
        config["arch"] = arch
    with open(tmp_path / "stage1" / "config.yaml", "w") as f:
        yaml.safe_dump(config, f)
    return path


# ------------------------------------------------------------------------------------------------
# Official numerics (eval mode)
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_official_checkpoint_reproduces_latents_and_codes(model, vectors):
    x = vectors["input_nchw"]
    close(model.encode(x), vectors["latent_ze"])
    codes = model.encode_tokens(x)
    assert codes.dtype == torch.int64 and codes.shape == (4, 8, 8, 3)
    assert torch.equal(codes, vectors["codes"])
    close(model.quantizer.embed_codes(codes), vectors["quant_latent"])


@torch.no_grad()
def test_official_checkpoint_reproduces_reconstructions(model, vectors):
    x = vectors["input_nchw"]
    recon, commitment_loss, codes = model(x)
    assert torch.equal(codes, vectors["codes"])
    close(recon, vectors["recon_forward"])
    close(model.decode_tokens(vectors["codes"]), vectors["recon_from_codes"])
    pixels = (recon * 0.5 + 0.5).clamp(0, 1).mul(255).to(torch.uint8).permute(0, 2, 3, 1)  # truncation
    assert (pixels.int() - vectors["recon_png_u8_nhwc"].int()).abs().max() <= 1
    assert_close(commitment_loss, vectors["commitment_loss_eval"], rtol=1e-5, atol=0)
    assert_close(F.mse_loss(recon, x), vectors["loss_recon_mse_eval"], rtol=1e-5, atol=0)


def test_official_soft_codes(model, vectors):
    probs, codes = model.soft_codes(vectors["input_nchw"], temp=0.7, stochastic=False)
    close(probs, vectors["soft_codes_t0.7"])
    assert torch.equal(codes, vectors["codes"])
    torch.manual_seed(0)
    sampled_probs, sampled = model.soft_codes(vectors["input_nchw"], temp=0.7, stochastic=True)
    assert sampled_probs.shape == (4, 8, 8, 3, 32) and sampled.shape == (4, 8, 8, 3)
    assert_close(sampled_probs.sum(-1), torch.ones(4, 8, 8, 3))


@pytest.mark.parametrize("mode", ["add", "select"])
def test_official_partial_decodes(model, vectors, mode):
    for depth in range(3):
        close(model.decode_partial_codes(vectors["codes"], depth, mode), vectors[f"recon_partial_{mode}"][depth])
    close(model.decode_partial_codes(vectors["codes"], 2, "add"), vectors["recon_from_codes"])


def test_codebook_usage_per_depth(model, vectors):
    stats = model.codebook_usage(vectors["codes"])
    # 26, 24 and 16 of the 32 codes occur at depths 0, 1, 2 (official summary)
    assert [stats[f"usage_d{d}"] for d in range(3)] == [26 / 32, 24 / 32, 16 / 32]
    assert all(1 <= stats[f"perplexity_d{d}"] <= 32 for d in range(3))


def test_per_depth_embeddings_sum_to_quantized_latent(model, vectors):
    embeds = model.embed_codes_with_depth(vectors["codes"])
    assert embeds.shape == (4, 8, 8, 3, 8)
    close(embeds.sum(-2), vectors["quant_latent"])  # divisor 1: code shape = latent shape


# ------------------------------------------------------------------------------------------------
# EMA codebook training
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, restart", [("ema_step_norestart", False), ("ema_step_restart", True)])
def test_ema_steps_match_official(model, vectors, key, restart):
    expected = vectors[key]
    quantizer = model.quantizer.train()
    for codebook in quantizer.codebooks:
        codebook.restart_unused_codes = restart
    torch.manual_seed(5678)
    for step in range(3):
        quant_out, commitment_loss, codes = quantizer(vectors["latent_ze"])
        assert torch.equal(codes, expected["codes"][step]), f"codes differ at call {step}"
        close(quant_out, expected["quant_out"][step])
        assert_close(commitment_loss, expected["commitment_loss"][step], rtol=1e-5, atol=0)
    codebook = quantizer.codebooks[0]
    for name in ("weight", "cluster_size_ema", "embed_ema"):
        assert_close(getattr(codebook, name), expected[name], rtol=1e-5, atol=1e-5)


def test_eval_mode_updates_nothing(model, vectors):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(vectors["input_nchw"])
    model.soft_codes(vectors["input_nchw"], stochastic=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_shared_codebook_is_one_module_updated_once_per_depth():
    torch.manual_seed(0)
    quantizer = RQBottleneck((4, 4, 6), (4, 4, 3), n_embed=16, decay=0.9, shared_codebook=True,
                             restart_unused_codes=False).train()
    assert all(cb is quantizer.codebooks[0] for cb in quantizer.codebooks)
    before = quantizer.codebooks[0].cluster_size_ema.clone()
    quantizer(torch.randn(2, 4, 4, 6))
    # three decays of 0.9 and 3 x 32 assigned vectors: sum = 0.9^3 * before + 0.1 * 32 * (0.9^2 + 0.9 + 1)
    assert_close(quantizer.codebooks[0].cluster_size_ema.sum(), 0.729 * before.sum() + 3.2 * 2.71)


def test_restart_with_fewer_vectors_than_codes_tiles_them_with_noise():
    torch.manual_seed(1)
    codebook = VQEmbedding(n_embed=10, dim=4, decay=0.5, restart_unused_codes=True).train()
    x = torch.randn(3, 4) * 10  # far from every code; 3 vectors < 10 codes
    codebook(x)
    # every count is below 1 after one step, so every code restarts from a tiled input plus noise in [0, 0.01/2)
    assert torch.equal(codebook.cluster_size_ema, torch.ones(10))
    offsets = codebook.embed_ema[:, None, :] - x[None]  # (10, 3, 4)
    nearest = offsets.abs().amax(-1).min(-1).values
    assert (nearest < 0.005).all()
    noise = offsets[torch.arange(10), offsets.abs().amax(-1).argmin(-1)]
    assert (noise >= 0).all() and (noise < 0.005).all() and noise.abs().sum() > 0
    assert torch.equal(codebook.weight[-1], torch.zeros(4))  # padding row untouched


def _distributed_ema_worker(rank: int, world_size: int, init_file: str, x: torch.Tensor, out: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(3)
    codebook = VQEmbedding(n_embed=8, dim=4, decay=0.8, restart_unused_codes=False).train()
    codebook(x.chunk(world_size)[rank])
    if rank == 0:
        torch.save(codebook.state_dict(), out)
    dist.destroy_process_group()


def test_ema_counts_and_sums_are_all_reduced_across_processes(tmp_path):
    x = torch.randn(32, 4)
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_distributed_ema_worker, args=(2, str(tmp_path / "init"), x, out), nprocs=2)
    torch.manual_seed(3)
    single = VQEmbedding(n_embed=8, dim=4, decay=0.8, restart_unused_codes=False).train()
    single(x)
    for key, value in torch.load(out, weights_only=True).items():
        assert_close(value, single.state_dict()[key], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Shapes: code-shape folding, separate codebooks, checkpointing
# ------------------------------------------------------------------------------------------------

def test_code_shape_folding_with_divisor_two():
    quantizer = RQBottleneck((4, 6, 3), (2, 3, 2), n_embed=8, shared_codebook=True)
    z = torch.randn(2, 4, 6, 3)
    folded = quantizer.to_code_shape(z)
    assert folded.shape == (2, 2, 3, 12)
    # one code vector = a 2x2 patch of latent vectors, patch row-major, channels fastest
    assert torch.equal(folded[1, 1, 2], torch.cat([z[1, 2, 4], z[1, 2, 5], z[1, 3, 4], z[1, 3, 5]]))
    assert torch.equal(quantizer.to_latent_shape(folded), z)


def test_rqvae_with_code_shape_divisor_two_round_trips():
    torch.manual_seed(0)
    model = RQVAE.from_config(tiny_arch(code_shape=[4, 4, 3])).eval()
    assert model.quantizer.codebooks[0].weight.shape == (33, 32)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, _, codes = model(x)
    assert codes.shape == (2, 4, 4, 3) and model.code_shape == (4, 4, 3)
    assert model.embed_codes_with_depth(codes).shape == (2, 4, 4, 3, 32)
    z_q = model.quantizer(model.encode(x))[0]
    close(model.quantizer.embed_codes(codes), z_q)
    close(model.decode_tokens(codes), recon)


def test_separate_codebooks_have_own_weights_and_keys():
    torch.manual_seed(0)
    model = RQVAE.from_config(tiny_arch(shared_codebook=False)).eval()
    codebooks = model.quantizer.codebooks
    assert len({id(cb) for cb in codebooks}) == 3
    assert not torch.equal(codebooks[0].weight, codebooks[1].weight)
    assert model.state_dict()["quantizer.codebooks.2.weight"].shape == (33, 8)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, loss, codes = model(x)
    assert recon.shape == x.shape and loss.shape == () and codes.shape == (2, 8, 8, 3)
    assert model.embed_codes_with_depth(codes).shape == (2, 8, 8, 3, 8)
    # the same codes mean different vectors at different depths
    same = torch.zeros_like(codes[:1])
    per_depth = model.embed_codes_with_depth(same)
    assert not torch.equal(per_depth[..., 0, :], per_depth[..., 1, :])


def build_on_meta(config_path: str) -> RQVAE:
    with torch.device("meta"):  # full-size models without allocating their weights
        return RQVAE.from_config(read_yaml(os.path.join(REPO, config_path))["arch"])


def test_ffhq_config_builds_the_official_state_dict_layout():
    model = build_on_meta("configs/ffhq/stage1/ffhq256-rqvae-8x8x4.yaml")
    listing = [f"{k} [{','.join(map(str, v.shape))}] {str(v.dtype).removeprefix('torch.')}"
               for k, v in model.state_dict().items()]
    with open(os.path.join(DATA, "rqvae_ffhq256_stage1.txt")) as f:
        assert listing == f.read().splitlines()
    # parameters count the shared codebook once: ~100.2M + 2049 x 256
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 100.73


def test_imagenet_config_puts_attention_at_8x8():
    keys = build_on_meta("configs/imagenet256/stage1/in256-rqvae-8x8x4.yaml").state_dict()
    assert "encoder.down.5.attn.1.q.weight" in keys and "decoder.up.5.attn.2.proj_out.weight" in keys
    assert not any(k.startswith(("encoder.down.4.attn", "decoder.up.4.attn")) for k in keys)
    assert keys["quantizer.codebooks.3.weight"].shape == (16385, 256)


def test_model_interface_properties(model):
    assert model.code_shape == (8, 8, 3)
    assert model.vocab_size == 32
    assert model.image_size == 16
    assert model.last_layer is model.decoder.conv_out.weight
    assert sum(v.numel() for v in model.state_dict().values()) == 455123


def test_activation_checkpointing_gives_the_same_gradients(vectors):
    x = vectors["input_nchw"][:2]
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = RQVAE.from_config({**tiny_arch(restart_unused_codes=False), "checkpointing": checkpointing}).train()
        recon, loss, _ = model(x)
        (F.mse_loss(recon, x) + loss).backward()
        grads.append(model.encoder.conv_in.weight.grad)
    close(grads[1], grads[0])


def test_attention_block_is_plain_single_head_attention():
    torch.manual_seed(0)
    block = AttnBlock(32).eval()
    x = torch.randn(2, 32, 4, 4)
    h = block.norm(x)
    q, k, v = (conv(h).flatten(2) for conv in (block.q, block.k, block.v))  # (B, C, HW)
    weights = torch.softmax(q.transpose(1, 2) @ k / 32 ** 0.5, dim=-1)  # (B, HW, HW)
    expected = x + block.proj_out((v @ weights.transpose(1, 2)).reshape(2, 32, 4, 4))
    close(block(x), expected)


def test_resampling_shapes_and_asymmetric_padding():
    down = Downsample(32)
    x = torch.randn(1, 32, 8, 8)
    assert down(x).shape == (1, 32, 4, 4)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    assert torch.equal(down(x), expected)
    assert Upsample(32)(x).shape == (1, 32, 16, 16)


# ------------------------------------------------------------------------------------------------
# Config schema
# ------------------------------------------------------------------------------------------------

def test_schema_accepts_official_saved_config():
    arch = validate(read_yaml(CONFIG)["arch"], RQVAE_ARCH, CONFIG)
    assert arch.hparams.n_embed == 32 and arch.ddconfig.ch_mult == [2, 1] and arch.ema is None


def test_schema_fills_official_defaults():
    arch = read_yaml(CONFIG)["arch"]
    for key in ("use_padding_idx", "masked_dropout", "loss_type", "restart_unused_codes"):
        del arch["hparams"][key]
    del arch["checkpointing"]
    arch = validate(arch, RQVAE_ARCH, "x.yaml")
    assert arch.hparams.loss_type == "l1" and arch.hparams.restart_unused_codes is False
    assert arch.checkpointing is False


@pytest.mark.parametrize("edit, message", [
    (lambda a: a["hparams"].update(n_embed="many"), "arch.hparams.n_embed must be an int"),
    (lambda a: a["ddconfig"].update(chmult=[1, 2]), "unknown key 'arch.ddconfig.chmult'"),
    (lambda a: a["hparams"].update(loss_type="l2"), "arch.hparams.loss_type must be one of mse, l1"),
    (lambda a: a["hparams"].update(latent_shape=[8, 8, 16]), "latent_shape must be [8, 8, 8]"),
    (lambda a: a["hparams"].update(code_shape=[3, 3, 2]), "code_shape [3, 3, 2] must divide"),
    (lambda a: a["ddconfig"].update(ch=48), "multiples of 32"),
    (lambda a: a["hparams"].pop("n_embed"), "missing required key 'arch.hparams.n_embed'"),
])
def test_bad_arch_is_a_config_error(edit, message):
    arch = read_yaml(CONFIG)["arch"]
    edit(arch)
    with pytest.raises(ConfigError, match=".*" + message.replace("[", r"\[").replace("]", r"\]")):
        RQVAE.from_config(arch, source="my.yaml")


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def test_bad_images_and_codes_are_refused(model, vectors):
    with pytest.raises(DataError, match="images must be"):
        model.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(DataError, match="multiples of 2"):
        model.encode(torch.zeros(1, 3, 15, 15))
    with pytest.raises(DataError, match=r"values in \[0, 32\)"):
        model.decode_tokens(vectors["codes"] + 32)
    with pytest.raises(DataError, match="codes must be an integer tensor"):
        model.decode_tokens(vectors["codes"][..., :2])
    with pytest.raises(DataError, match="'add' or 'select'"):
        model.decode_partial_codes(vectors["codes"], 0, "sum")
    with pytest.raises(DataError, match="depth 3 is out of range"):
        model.decode_partial_codes(vectors["codes"], 3)


# ------------------------------------------------------------------------------------------------
# Official checkpoints: loading, errors, export
# ------------------------------------------------------------------------------------------------

def test_official_layout_is_recognised():
    ckpt = torch.load(CKPT, weights_only=True)
    assert is_official_rqvae_checkpoint(ckpt)
    assert not is_official_rqvae_checkpoint({"state_dict": {"blocks.0.weight": torch.zeros(1)}})
    assert not is_official_rqvae_checkpoint({"model": {}})
    assert not is_official_rqvae_checkpoint([1, 2])
    disc = official_discriminator_state(ckpt)
    assert "main.0.weight" in disc and len(disc) == 16
    with pytest.raises(CheckpointError, match="no 'discriminator'"):
        official_discriminator_state({"state_dict": ckpt["state_dict"]})


def test_missing_key_is_listed(tmp_path):
    state = torch.load(CKPT, weights_only=True)["state_dict"]
    del state["decoder.up.0.block.0.nin_shortcut.bias"]
    path = copy_official(tmp_path, state_dict=state)
    with pytest.raises(CheckpointError, match="missing keys: decoder.up.0.block.0.nin_shortcut.bias"):
        load_official_rqvae(path)


def test_wrong_shape_is_listed(tmp_path):
    state = torch.load(CKPT, weights_only=True)["state_dict"]
    state["quant_conv.bias"] = torch.zeros(9)
    state["encoder.extra.weight"] = torch.zeros(1)
    path = copy_official(tmp_path, state_dict=state)
    with pytest.raises(CheckpointError, match=r"unexpected keys: encoder.extra.weight.*quant_conv.bias \(9,\) vs \(8,\)"):
        load_official_rqvae(path)


def test_config_that_does_not_match_the_weights_is_refused(tmp_path):
    arch = read_yaml(CONFIG)["arch"]
    arch["hparams"]["n_embed"] = 64
    path = copy_official(tmp_path, arch=arch)
    with pytest.raises(CheckpointError, match=r"quantizer.codebooks.0.weight \(33, 8\) vs \(65, 8\)"):
        load_official_rqvae(path)


def test_differing_copies_of_a_shared_codebook_are_refused(tmp_path):
    state = torch.load(CKPT, weights_only=True)["state_dict"]
    state["quantizer.codebooks.1.weight"] = state["quantizer.codebooks.1.weight"] + 1
    path = copy_official(tmp_path, state_dict=state)
    with pytest.raises(CheckpointError, match=r"quantizer.codebooks.\*.weight of the shared codebook differ"):
        load_official_rqvae(path)


def test_missing_config_yaml_names_the_expected_path(tmp_path):
    shutil.copy(CKPT, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=f"put it at {tmp_path / 'config.yaml'}"):
        load_official_rqvae(str(tmp_path / "model.pt"))


def test_unreadable_checkpoint_is_a_checkpoint_error(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    shutil.copy(CONFIG, tmp_path / "config.yaml")
    with pytest.raises(CheckpointError):
        load_official_rqvae(str(tmp_path / "model.pt"))
    torch.save({"model": {}}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="not an official RQ-VAE stage-1 checkpoint"):
        load_official_rqvae(str(tmp_path / "model.pt"))


def test_export_then_load_round_trips(model, vectors, tmp_path):
    model.quantizer.train()
    model.quantizer(vectors["latent_ze"])  # move the codebook away from the file's state
    model.eval()
    arch = validate(read_yaml(CONFIG)["arch"], RQVAE_ARCH, CONFIG)
    path = str(tmp_path / "export" / "model.pt")
    export_official_rqvae(model, arch, path)
    saved = torch.load(path, weights_only=True)
    assert is_official_rqvae_checkpoint(saved)
    for d in range(3):  # every depth's copy of the shared codebook is written
        assert torch.equal(saved["state_dict"][f"quantizer.codebooks.{d}.weight"], model.quantizer.codebooks[0].weight)
    assert read_yaml(str(tmp_path / "export" / "config.yaml"))["arch"] == arch.to_dict()
    loaded = load_official_rqvae(path).eval()
    x = vectors["input_nchw"]
    assert torch.equal(loaded.encode_tokens(x), model.encode_tokens(x))
    assert torch.equal(loaded.decode_tokens(vectors["codes"]), model.decode_tokens(vectors["codes"]))
