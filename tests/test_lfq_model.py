"""Open-MAGVIT2 LFQ tokenizer: numerics against the official code's vectors, the exact factorised
entropy against the full softmax, official checkpoint and YAML loading, and refused bad input.

Reference data (tests/data/lfq/, see its README) was produced by the official TencentARC/Open-MAGVIT2
code on a tiny 8-bit tokenizer: 32x32 images, 8x16x16 latents, 256 codes.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.testing import assert_close

from common.checkpoint import strict_load
from common.config import read_yaml, validate
from common.errors import CheckpointError, ConfigError, DataError
from common.losses import NLayerDiscriminator
from lfq.layers import AdaptiveGroupNorm, depth_to_space
from lfq.model import LFQTokenizer
from lfq.official import (arch_from_official, ema_key, load_official_lfq, official_discriminator_state,
                          official_generator_state, read_lightning_state, read_official_config)
from lfq.quantizer import (LookupFreeQuantizer, codes_to_latent, factorized_entropies, full_entropies,
                           latent_to_codes, merge_codes, split_codes)
from lfq.schema import OPENMAGVIT2_SCHEMA

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data", "lfq")
CKPT = os.path.join(DATA, "small_lfq.ckpt")
CONFIG = os.path.join(DATA, "small_config.yaml")


def close(actual, expected):
    assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def vectors():
    return torch.load(os.path.join(DATA, "tensors.pt"), weights_only=True)


@pytest.fixture(scope="module")
def scalars():
    with open(os.path.join(DATA, "scalars.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def model():
    return load_official_lfq(CKPT, CONFIG)


def write_yaml(path, data) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return str(path)


def official_lfqgan_256_config() -> dict:
    """Every key and value of the official configs/Open-MAGVIT2/gpu/imagenet_lfqgan_256_L.yaml."""
    split = lambda target: {"target": f"src.Open_MAGVIT2.data.imagenet.{target}",  # noqa: E731
                            "params": {"config": {"size": 256, "subset": None}}}
    return {
        "seed_everything": True,
        "trainer": {
            "accelerator": "gpu", "strategy": "ddp_find_unused_parameters_true", "devices": 8, "num_nodes": 4,
            "precision": "16-mixed", "max_epochs": 270, "check_val_every_n_epoch": 1, "num_sanity_val_steps": -1,
            "log_every_n_steps": 100,
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": "../../checkpoints/vqgan/test", "save_top_k": -1}},
                {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
                 "init_args": {"logging_interval": "step"}}],
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": "../../results/vqgan/", "version": "test", "name": None}},
        },
        "model": {
            "class_path": "src.Open_MAGVIT2.models.lfqgan.VQModel",
            "init_args": {
                "ddconfig": {"double_z": False, "z_channels": 18, "resolution": 128, "in_channels": 3, "out_ch": 3,
                             "ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 4},
                "lossconfig": {
                    "target": "src.Open_MAGVIT2.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                    "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 0, "disc_weight": 0.8,
                               "gen_loss_weight": 0.1, "lecam_loss_weight": 0.05, "codebook_weight": 0.1,
                               "commit_weight": 0.25, "codebook_enlarge_ratio": 0, "codebook_enlarge_steps": 2000}},
                "n_embed": 262144, "embed_dim": 18, "learning_rate": "1e-4", "sample_minimization_weight": 1.0,
                "batch_maximization_weight": 1.0, "scheduler_type": "None", "use_ema": True, "resume_lr": None,
                "lr_drop_epoch": [200, 250],
            },
        },
        "data": {"class_path": "main.DataModuleFromConfig",
                 "init_args": {"batch_size": 8, "num_workers": 16, "train": split("ImageNetTrain"),
                               "validation": split("ImageNetValidation"), "test": split("ImageNetValidation")}},
        "ckpt_path": None,
    }


# ----------------------------------------------------------------------------------------------
# Official checkpoint: EMA weights, codes, reconstructions
# ----------------------------------------------------------------------------------------------

def test_official_checkpoint_reproduces_codes_and_reconstruction(model, vectors):
    images = vectors["images"]
    with torch.no_grad():
        close(model.encode(images), vectors["h"])
        recon, losses, codes = model(images)
    assert codes.shape == (4, 16, 16) and codes.dtype == torch.int64
    assert torch.equal(codes.flatten(), vectors["indices"])
    close(recon, vectors["rec"])
    assert all(float(loss) == 0.0 for loss in losses)  # eval mode: no auxiliary losses
    assert torch.equal(model.encode_tokens(images), codes)
    with torch.no_grad():
        close(model.decode(vectors["quant"]), vectors["rec"])
    close(model.decode_tokens(vectors["indices"].view(4, 16, 16)), vectors["rec_from_indices"])


def test_loader_uses_ema_weights_unless_asked_for_raw(vectors):
    raw = load_official_lfq(CKPT, CONFIG, use_ema=False)
    with torch.no_grad():
        recon, _, codes = raw(vectors["images"])
    assert torch.equal(codes.flatten(), vectors["indices_raw"])
    close(recon, vectors["rec_raw"])
    state = read_lightning_state(CKPT)
    ema = official_generator_state(state, raw, use_ema=True, source=CKPT)
    assert torch.equal(ema["decoder.conv_out.weight"], state["model_ema.decoderconv_outweight"])
    assert not torch.equal(ema["decoder.conv_out.weight"], state["decoder.conv_out.weight"])


def test_reconstruction_pngs_match_official(model, vectors):
    inputs = np.stack([np.asarray(Image.open(os.path.join(DATA, f"input_{i}.png")).convert("RGB")) for i in range(4)])
    images = torch.from_numpy(inputs.astype(np.float64) / 127.5 - 1.0).float().permute(0, 3, 1, 2)
    assert torch.equal(images, vectors["images"])
    with torch.no_grad():
        recon = model(images)[0].clamp(-1, 1)
    ours = (255 * ((recon + 1) / 2)).permute(0, 2, 3, 1).numpy().astype(np.uint8).astype(int)
    official = np.stack([np.asarray(Image.open(os.path.join(DATA, f"rec_{i}.png"))) for i in range(4)]).astype(int)
    assert np.abs(ours - official).max() <= 1
    assert (ours != official).sum() <= 8  # truncation flips only where a value straddles an integer


def test_discriminator_state_for_fine_tuning(vectors):
    state = read_lightning_state(CKPT)
    raw = official_discriminator_state(state, CKPT)
    assert set(raw) == {k[len("loss.discriminator."):] for k in state if k.startswith("loss.discriminator.")}
    assert torch.equal(raw["main.0.weight"], state["loss.discriminator.main.0.weight"])
    ema = official_discriminator_state(state, CKPT, use_ema=True)
    assert torch.equal(ema["main.0.weight"], state[ema_key("loss.discriminator.main.0.weight")])
    assert not torch.equal(ema["main.0.weight"], raw["main.0.weight"])
    bn_stats = [k for k in raw if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert bn_stats and all(torch.equal(ema[k], raw[k]) for k in bn_stats)  # buffers have no EMA copy
    discriminator = NLayerDiscriminator(in_channels=3, ndf=16, n_layers=1).train()  # the small config's PatchGAN
    strict_load(discriminator, raw, CKPT)
    with torch.no_grad():  # real and fake in separate calls: BatchNorm uses each batch's statistics
        assert_close(discriminator(vectors["images"]), vectors["disc_logits_real"], rtol=0, atol=1e-5)
        assert_close(discriminator(vectors["rec"]), vectors["disc_logits_fake"], rtol=0, atol=1e-5)
    generator_only = {k: v for k, v in state.items() if not k.startswith("loss.")}
    with pytest.raises(CheckpointError, match="no loss.discriminator"):
        official_discriminator_state(generator_only, CKPT)


def test_full_size_configs_match_official_key_listing():
    for size, ch_mult, counts in ((256, [1, 1, 2, 2, 4], (49_751_442, 65_376_387)),
                                  (128, [1, 2, 2, 4], (48_422_162, 63_599_491))):
        with torch.device("meta"):
            model = LFQTokenizer(128, ch_mult, 4, 18, size)
        with open(os.path.join(DATA, f"keys_openmagvit2_lfq_{size}.txt")) as f:
            lines = [line.split() for line in f]
        official = [(key, shape) for key, shape, _ in lines if not key.startswith("model_ema.")]
        ours = [(k, "[" + ",".join(map(str, v.shape)) + "]") for k, v in model.state_dict().items()]
        assert ours == official
        ema_names = {key for key, _, _ in lines if key.startswith("model_ema.")} - {
            "model_ema.decay", "model_ema.num_updates"}
        assert {ema_key(k) for k, _ in ours} == {k for k in ema_names if not k.startswith("model_ema.loss")}
        assert (sum(p.numel() for p in model.encoder.parameters()),
                sum(p.numel() for p in model.decoder.parameters())) == counts
        assert model.code_shape == (16, 16) and model.vocab_size == 2 ** 18


# ----------------------------------------------------------------------------------------------
# Quantizer: bit order, sub-codes, losses
# ----------------------------------------------------------------------------------------------

def test_bit_order_channel_zero_is_least_significant():
    K = 6
    z = -torch.ones(K, K, 1, 1)
    z[torch.arange(K), torch.arange(K)] = 0.5  # sample d: only channel d positive
    assert latent_to_codes(z).flatten().tolist() == [2 ** d for d in range(K)]
    assert latent_to_codes(torch.zeros(1, K, 1, 1)).item() == 0  # z = 0 is bit 0 / value -1
    codes = torch.arange(2 ** K).view(4, 4, 4)
    latent = codes_to_latent(codes, K)
    assert latent.shape == (4, K, 4, 4) and set(latent.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(latent_to_codes(latent), codes)


def test_quantizer_matches_official_outputs(vectors):
    quantizer = LookupFreeQuantizer(8).eval()
    quant, _, codes = quantizer(vectors["h"])
    assert torch.equal(quant, vectors["quant"])
    assert torch.equal(codes.flatten(), vectors["indices"])
    assert torch.equal(codes_to_latent(codes, 8), vectors["quant_from_indices"])
    quant, _, codes = quantizer(vectors["caseB_z"])
    assert torch.equal(quant, vectors["caseB_quant"])
    assert torch.equal(codes.flatten(), vectors["caseB_indices"])


def test_factorized_sub_codes_match_official(vectors):
    pre, post = split_codes(vectors["indices"], [3, 5])
    assert torch.equal(pre, vectors["indices_pre_3bits"])
    assert torch.equal(post, vectors["indices_post_5bits"])
    assert torch.equal(merge_codes(pre, post, [3, 5]), vectors["indices"])


@pytest.mark.parametrize("entropy_mode", ["factorized", "full"])
@pytest.mark.parametrize("latent,reference", [("h", "lfq_train_mode_on_h"), ("caseB_z", "lfq_caseB")])
def test_quantizer_losses_match_official(vectors, scalars, entropy_mode, latent, reference):
    quantizer = LookupFreeQuantizer(8, 0.8, 1.2, entropy_mode).train()
    _, losses, _ = quantizer(vectors[latent])
    expected = scalars[reference]
    for ours, name in zip(losses, ("entropy_aux_loss", "per_sample_entropy", "codebook_entropy", "commitment")):
        assert_close(ours, torch.tensor(expected[name]), rtol=1e-4, atol=1e-5)
    _, losses, _ = quantizer.eval()(vectors[latent])
    assert all(float(loss) == 0.0 for loss in losses)


def entropies_and_gradient(entropies, z):
    z = z.clone().requires_grad_()
    per_sample, codebook = entropies(z)
    (gradient,) = torch.autograd.grad(0.8 * per_sample - 1.2 * codebook, z)
    return torch.stack([per_sample, codebook]).detach(), gradient


@pytest.mark.parametrize("num_bits", [1, 5, 8, 10])
@pytest.mark.parametrize("scale", [0.003, 0.03, 0.3, 3.0])
def test_factorized_entropy_equals_full_softmax(num_bits, scale):
    z = scale * torch.randn(64, num_bits, generator=torch.Generator().manual_seed(num_bits))
    full, full_grad = entropies_and_gradient(full_entropies, z.double())
    fast, fast_grad = entropies_and_gradient(factorized_entropies, z.double())
    assert_close(fast, full, rtol=1e-10, atol=1e-10)  # the same function, not an approximation
    assert_close(fast_grad, full_grad, rtol=1e-9, atol=1e-10)
    # fp32 against the float64 truth (the fp32 full softmax itself is off by up to ~3e-5 here)
    fast, fast_grad = entropies_and_gradient(factorized_entropies, z)
    assert_close(fast, full.float(), rtol=1e-5, atol=1e-5)
    assert_close(fast_grad, full_grad.float(), rtol=0, atol=1e-5 * max(1.0, float(full_grad.abs().max())))


@pytest.mark.parametrize("num_bits,modes", [(10, (full_entropies, factorized_entropies)), (14, (factorized_entropies,))])
def test_entropy_limits(num_bits, modes):
    every_code = torch.arange(2 ** num_bits).view(1, 1, -1)
    confident = 5.0 * codes_to_latent(every_code, num_bits)[0, :, 0].t()  # (2^K, K): each code once, |z| large
    for entropies in modes:
        per_sample, codebook = entropies(confident)
        assert float(per_sample) < 1e-6
        assert_close(codebook, torch.tensor(-np.log(2.0 ** -num_bits + 1e-5), dtype=torch.float32), rtol=1e-5, atol=0)


def test_training_forward_returns_losses_with_gradients():
    torch.manual_seed(0)
    model = LFQTokenizer(32, [1, 2], 1, 6, 16).train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, losses, codes = model(x)
    losses_now = [float(loss.detach()) for loss in losses]
    assert recon.shape == x.shape and codes.shape == (2, 8, 8) and codes.max() < model.vocab_size
    assert all(value > 0 for value in losses_now[1:])
    assert_close(losses.entropy_aux, losses.per_sample_entropy - losses.codebook_entropy)
    ((recon - x).abs().mean() + 0.1 * losses.entropy_aux + 0.25 * losses.commitment).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # through the straight-through estimator
    assert model.last_layer is model.decoder.conv_out.weight and model.last_layer.grad is not None


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

def test_depth_to_space_is_dcr_not_pixel_shuffle():
    C, H, W = 3, 2, 2
    x = torch.arange(4 * C, dtype=torch.float32).view(1, 4 * C, 1, 1).expand(1, 4 * C, H, W)
    y = depth_to_space(x)
    assert y.shape == (1, C, 2 * H, 2 * W)
    for c in range(C):
        for i in range(2):
            for j in range(2):
                assert (y[0, c, i::2, j::2] == i * 2 * C + j * C + c).all()
    assert not torch.equal(y, torch.nn.functional.pixel_shuffle(x, 2))


def test_adaptive_group_norm_uses_unbiased_std_of_the_latent():
    K = C = 32
    agn = AdaptiveGroupNorm(K, C)
    with torch.no_grad():
        agn.gamma.weight.copy_(torch.eye(C))
        agn.gamma.bias.zero_()
        agn.beta.weight.zero_()
        agn.beta.bias.zero_()
    quant = torch.ones(1, K, 4, 4)
    quant[:, :, 0, :3] = -1.0  # 3 of 16 positions at -1: mean m = 10 / 16
    m, hw = 10 / 16, 16
    sigma = np.sqrt((1 - m ** 2) * hw / (hw - 1) + 1e-6)
    x = torch.randn(1, C, 8, 8)
    close(agn(x, quant), torch.nn.functional.group_norm(x, 32, eps=1e-6) * sigma)


# ----------------------------------------------------------------------------------------------
# Configs and bad input
# ----------------------------------------------------------------------------------------------

def test_official_yamls_are_accepted(tmp_path):
    small = read_official_config(CONFIG)
    assert small.model.init_args.lossconfig.params.disc_ndf == 16
    assert arch_from_official(small, CONFIG)["image_size"] == 32
    path = write_yaml(tmp_path / "imagenet_lfqgan_256_L.yaml", official_lfqgan_256_config())
    config = validate(read_yaml(path), OPENMAGVIT2_SCHEMA, path)
    assert config.model.init_args.learning_rate == 1e-4
    assert config.model.init_args.factorized_bits == [9, 9]  # official default filled in
    arch = arch_from_official(read_official_config(path), path)
    assert arch["image_size"] == 256 and arch["embed_dim"] == 18  # not the leftover ddconfig.resolution 128
    with torch.device("meta"):
        assert LFQTokenizer.from_config(arch, path).code_shape == (16, 16)


def test_other_yaml_is_not_an_openmagvit2_tokenizer_config(tmp_path):
    ar = official_lfqgan_256_config()
    ar["model"] = {"class_path": "src.Open_MAGVIT2.models.cond_transformer_gpt.Net2NetTransformer",
                   "init_args": {"learning_rate": 3e-4}}
    path = write_yaml(tmp_path / "ar.yaml", ar)
    with pytest.raises(ConfigError, match="not an Open-MAGVIT2 tokenizer config"):
        read_official_config(path)
    with pytest.raises(ConfigError, match="model.class_path"):
        validate(read_yaml(path), OPENMAGVIT2_SCHEMA, path)
    path = write_yaml(tmp_path / "rqvae.yaml", {"arch": {"type": "rq-vae"}, "dataset": {"type": "ffhq"}})
    with pytest.raises(ConfigError, match="not an Open-MAGVIT2 tokenizer config"):
        load_official_lfq(CKPT, path)


def test_checkpoint_bit_count_must_match_config(tmp_path):
    config = read_yaml(CONFIG)
    args = config["model"]["init_args"]
    args["ddconfig"]["z_channels"] = args["embed_dim"] = 10
    args["n_embed"] = 1024
    path = write_yaml(tmp_path / "config_10bit.yaml", config)
    with pytest.raises(CheckpointError, match="8-bit codes .* config says 10 bits"):
        load_official_lfq(CKPT, path)


def test_inconsistent_arch_is_refused(tmp_path):
    config = read_yaml(CONFIG)
    config["model"]["init_args"]["n_embed"] = 1000
    path = write_yaml(tmp_path / "bad.yaml", config)
    with pytest.raises(ConfigError, match="log2\\(n_embed\\)"):
        load_official_lfq(CKPT, path)


def test_wrong_checkpoint_is_refused(tmp_path):
    path = str(tmp_path / "rqvae.pt")
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1), "quantizer.codebooks.0.weight": torch.zeros(1)}},
               path)
    with pytest.raises(CheckpointError, match="not an Open-MAGVIT2 tokenizer checkpoint"):
        load_official_lfq(path, CONFIG)
    state = read_lightning_state(CKPT)
    del state["decoder.conv_out.bias"], state["model_ema.decoderconv_outbias"]
    path = str(tmp_path / "damaged.ckpt")
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match="missing keys: decoder.conv_out.bias"):
        load_official_lfq(path, CONFIG)


def test_bad_images_and_codes_are_refused(model):
    for bad in (torch.zeros(1, 3, 33, 32), torch.zeros(3, 32, 32), torch.zeros(1, 1, 32, 32),
                torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, 3, 2, 2)):
        with pytest.raises(DataError, match="images must be"):
            model.encode_tokens(bad)
    assert model.encode_tokens(torch.zeros(1, 3, 64, 48)).shape == (1, 32, 24)  # fully convolutional
    for bad in (torch.zeros(1, 16, 16), torch.full((1, 16, 16), 256), torch.zeros(16, 16, dtype=torch.long)):
        with pytest.raises(DataError, match="codes must be"):
            model.decode_tokens(bad)
