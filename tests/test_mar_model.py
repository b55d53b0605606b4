"""The MAR prior (encoder/decoder, DiffLoss, diffusion, sampler) against the official code's outputs.

tests/data/mar/ holds the official tiny MAR training checkpoint (5x5 tokens of 8 channels, encoder
32 wide / 2 blocks / 4 heads, decoder 24 / 1 / 2, buffer 3, 12 classes, DiffLoss 3 x 32, 8 sampling
steps; EMA and raw weights differ on purpose), the official outputs on it (`mar_ref.npz`,
`mar_sample_ref.npz`), respaced schedules, and the key listings of the released MAR-B/L/H. With random
weights the first reverse step amplifies noise-prediction errors by 1/sqrt(abar) ~ 2e4, so sampled
tokens reach 1e3..6e4 and are compared relative to their largest value.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from common.checkpoint import load_file
from common.errors import CheckpointError, ConfigError, DataError
from mar import diffloss as diffloss_module
from mar.diffusion import GaussianDiffusion, space_timesteps
from mar.model import MAR, MAR_MODELS
from mar.official import load_official_mar, official_mar_state
from tests.helpers import DATA

MAR_DATA = os.path.join(DATA, "mar")
CKPT = os.path.join(MAR_DATA, "mar_tiny", "checkpoint-last.pth")
META = json.load(open(os.path.join(MAR_DATA, "meta.json")))
REF = {k: torch.from_numpy(v) for k, v in np.load(os.path.join(MAR_DATA, "mar_ref.npz")).items()}
SAMPLES = dict(np.load(os.path.join(MAR_DATA, "mar_sample_ref.npz")))
SCHEDULES = dict(np.load(os.path.join(MAR_DATA, "diffusion_schedules.npz")))
# what the file's args cannot tell: the tiny model's widths, depths and heads (eps as in the named models)
TINY_ARCH = {key: META["tiny_mar"][key] for key in ("encoder_embed_dim", "encoder_depth", "encoder_num_heads",
                                                     "decoder_embed_dim", "decoder_depth", "decoder_num_heads")}
TINY_ARCH["norm_eps"] = 1e-6
RELEASED = {"mar_base": 207_924_768, "mar_large": 478_326_304, "mar_huge": 942_403_104}


@pytest.fixture(scope="module")
def ema_model() -> MAR:
    return load_official_mar(CKPT, arch=TINY_ARCH)[0]


@pytest.fixture(scope="module")
def raw_model() -> MAR:
    return load_official_mar(CKPT, use_ema=False, arch=TINY_ARCH)[0]


def assert_close_to_largest(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """Max abs difference <= tolerance * max abs of the expected values."""
    error = (actual - expected).abs().max().item()
    assert error <= tolerance * expected.abs().max().item(), (error, expected.abs().max().item())


def reference_visible(num_masked: int = 15) -> torch.Tensor:
    """The known positions of the reference inputs: all but orders[b, :num_masked], ascending."""
    return REF["orders"][:, num_masked:].sort(dim=1).values


# ----------------------------------------------------------------------------------------------
# Official checkpoint
# ----------------------------------------------------------------------------------------------

def test_official_checkpoint_loads_ema_weights_by_default(ema_model, raw_model):
    assert ema_model.seq_len == 25 and ema_model.token_embed_dim == 8 and ema_model.num_classes == 12
    assert ema_model.num_sampling_steps == "8" and ema_model.diffusion_batch_mul == 3
    assert not ema_model.training
    assert sum(p.numel() for p in ema_model.parameters()) == META["n_params"]
    visible = reference_visible()
    with torch.no_grad():
        z = {name: model.decode(model.encode(REF["tokens"], visible, model.class_emb(REF["labels"])), visible)
             for name, model in (("ema", ema_model), ("model", raw_model))}
    assert_close(z["ema"], REF["z_cond_ema"], rtol=1e-5, atol=1e-5)
    assert_close(z["model"], REF["z_cond_model"], rtol=1e-5, atol=1e-5)
    assert (z["ema"] - z["model"]).abs().max() > 0.5  # the two weight sets are told apart


def test_official_state_picks_ema_or_raw_weights_and_accepts_any_extras(tmp_path):
    obj = load_file(CKPT)
    assert {"model", "model_ema", "optimizer", "epoch", "scaler", "args"} <= set(obj)
    ema, raw = official_mar_state(obj), official_mar_state(obj, use_ema=False)
    assert all(ema[k] is obj["model_ema"][k] for k in ema) and all(raw[k] is obj["model"][k] for k in raw)
    assert official_mar_state({"model": obj["model"]}) is not None  # no EMA: the raw weights
    assert official_mar_state(obj["model"]) is None and official_mar_state({"model": {"x": torch.zeros(1)}}) is None
    # only the weights, no args: the caller's arch (here a name plus the tiny sizes) builds the model
    bare = tmp_path / "checkpoint-last.pth"
    torch.save({"model": obj["model"], "model_ema": obj["model_ema"]}, bare)
    with pytest.raises(CheckpointError, match="pass its arch"):
        load_official_mar(str(bare))
    model, arch = load_official_mar(str(bare), arch={**TINY_ARCH, **{k: META["tiny_mar"][k] for k in (
        "img_size", "vae_embed_dim", "class_num", "buffer_size", "diffloss_d", "diffloss_w", "num_sampling_steps")}})
    assert arch["type"] == "mar" and arch["model"] is None
    assert all(torch.equal(v, obj["model_ema"][k]) for k, v in model.state_dict().items())


def test_official_checkpoint_of_an_unreleased_model_needs_its_arch():
    with pytest.raises(CheckpointError, match="'mar_tiny' is not a released MAR"):
        load_official_mar(CKPT)
    with pytest.raises(CheckpointError, match="not an official MAR checkpoint"):
        load_official_mar(os.path.join(MAR_DATA, "vae_tiny.ckpt"))


# ----------------------------------------------------------------------------------------------
# Tokens, encoder, decoder
# ----------------------------------------------------------------------------------------------

def test_patchify_orders_tokens_row_major_and_unpatchify_inverts_it(ema_model):
    assert torch.equal(ema_model.patchify(REF["latents"]), REF["tokens"])
    assert torch.equal(ema_model.unpatchify(REF["tokens"]), REF["unpatchify_roundtrip"])
    model = MAR(img_size=48, vae_stride=8, patch_size=2, vae_embed_dim=5, encoder_embed_dim=8, encoder_depth=1,
                encoder_num_heads=1, decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=1, buffer_size=1,
                diffloss_d=1, diffloss_w=8, num_sampling_steps="4")
    assert torch.equal(model.patchify(REF["p2_in"]), REF["p2_tokens"])
    assert torch.equal(model.unpatchify(REF["p2_tokens"]), REF["p2_back"])


@pytest.mark.parametrize("weights", ["ema", "model"])
def test_encoder_output_matches_official(ema_model, raw_model, weights):
    model = ema_model if weights == "ema" else raw_model
    with torch.no_grad():
        out = model.encode(REF["tokens"], reference_visible(), model.class_emb(REF["labels"]))
    assert out.shape == (2, 3 + 10, 32)  # buffer first, then the 10 known tokens
    assert_close(out, REF[f"enc_out_{weights}"], rtol=1e-5, atol=1e-5)


def test_unconditional_and_all_masked_decoder_outputs_match_official(ema_model):
    visible, nothing = reference_visible(), torch.zeros(2, 0, dtype=torch.long)
    with torch.no_grad():
        uncond = ema_model.decode(ema_model.encode(REF["tokens"], visible, ema_model.class_embedding(None, 2)),
                                  visible)
        first_step = ema_model.decode(ema_model.encode(torch.zeros_like(REF["tokens"]), nothing,
                                                       ema_model.class_emb(REF["labels"])), nothing)
    assert_close(uncond, REF["z_uncond_ema"], rtol=1e-5, atol=1e-5)
    assert_close(first_step, REF["z_allmasked_ema"], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# DiffLoss network and diffusion
# ----------------------------------------------------------------------------------------------

def test_diffloss_network_and_guidance_wrapper_match_official(ema_model):
    net = ema_model.diffloss.net
    with torch.no_grad():
        assert_close(net(REF["net_x_t"], REF["net_t"], REF["net_c"]), REF["net_out"], rtol=1e-5, atol=1e-5)
        assert_close(net.time_embed(REF["net_t"]), REF["net_t_emb"], rtol=1e-5, atol=1e-5)
        # one frequency may round one ulp apart on another CPU's vectorised exp; at t = 999 that moves
        # the sinusoid's argument by one ulp of ~400 (3e-5), so the raw table gets a wider tolerance
        assert_close(net.time_embed.frequencies(REF["net_t"], 256), REF["net_t_freq"], rtol=1e-5, atol=1e-4)
        guided = net.forward_with_cfg(REF["cfg_x"], REF["cfg_t"], REF["cfg_c"], float(REF["cfg_scale"]))
    assert_close(guided, REF["cfg_out"], rtol=1e-5, atol=1e-5)


def test_training_terms_match_official(ema_model):
    net, diffusion = ema_model.diffloss.net, ema_model.diffloss.train_diffusion
    with torch.no_grad():
        terms = diffusion.training_losses(lambda x_t, t: net(x_t, t, REF["net_c"]), REF["tl_x0"], REF["tl_t"],
                                          REF["tl_noise"])
    for name in ("mse", "vb", "loss"):
        assert_close(terms[name], REF[f"tl_{name}"], rtol=1e-4, atol=1e-5)
    masked_mean = (terms["loss"] * REF["tl_mask"]).sum() / REF["tl_mask"].sum()
    assert_close(masked_mean, REF["tl_masked_mean"], rtol=1e-4, atol=1e-5)


def test_respaced_reverse_step_matches_official(ema_model):
    diffusion = ema_model.diffloss.gen_diffusion()
    t = REF["pmv_t_spaced"]
    assert diffusion.original_step(t).tolist() == [999, 999, 571, 571, 143, 0]
    with torch.no_grad():
        out = ema_model.diffloss.net(REF["net_x_t"], diffusion.original_step(t), REF["net_c"])
    prediction = diffusion.p_mean_variance(out, REF["net_x_t"], t)
    for name in ("mean", "variance", "log_variance", "pred_xstart"):
        assert_close_to_largest(getattr(prediction, name), REF[f"pmv_{name}"], 1e-5)


def test_reverse_loops_at_temperature_zero_match_official(ema_model, monkeypatch):
    diffloss, c, noise = ema_model.diffloss, REF["net_c"], REF["loop_noise"]
    steps = torch.tensor(diffloss.gen_diffusion().timestep_map)
    # the reference loop, network called on every row as the official sampler does
    loop = diffloss.gen_diffusion().p_sample_loop(
        lambda x, k: diffloss.net.forward_with_cfg(x, steps[k].expand(6), c, 3.5), torch.cat([noise, noise]),
        lambda: torch.randn(6, 8), temperature=0.0)
    assert_close_to_largest(loop, REF["loop_cfg_t0"], 1e-5)
    # DiffLoss.sample: embeddings computed once, only the guided half's state kept
    monkeypatch.setattr(diffloss_module.NoiseSource, "start", lambda self, *shape: noise.clone())
    assert_close_to_largest(diffloss.sample(c[:3], temperature=0.0), REF["loop_nocfg_t0"], 1e-5)
    assert_close_to_largest(diffloss.sample(c, temperature=0.0, cfg=3.5), REF["loop_cfg_t0"][:3], 1e-5)


@pytest.mark.parametrize("spec", ["8", "16", "40", "100", "ddim25"])
def test_respaced_schedules_match_official(spec):
    diffusion = GaussianDiffusion.respaced(spec)
    assert diffusion.timestep_map == SCHEDULES[f"map_{spec}"].tolist()
    np.testing.assert_allclose(diffusion.betas, SCHEDULES[f"betas_{spec}"], rtol=1e-12, atol=0)
    if spec == "8":
        np.testing.assert_allclose(diffusion.posterior_log_variance_clipped,
                                   SCHEDULES["posterior_log_variance_clipped_8"], rtol=1e-12, atol=0)


def test_training_schedule_is_the_full_cosine_one():
    diffusion = GaussianDiffusion.respaced("")
    np.testing.assert_allclose(diffusion.betas, SCHEDULES["betas_train"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(diffusion.alphas_cumprod, SCHEDULES["alphas_cumprod_train"], rtol=1e-12, atol=0)
    assert diffusion.identity_map and diffusion.betas[-1] == 0.999


def test_linear_schedule_is_ddpms_and_reaches_a_far_larger_final_alpha_bar():
    linear, cosine = GaussianDiffusion.respaced("", schedule="linear"), GaussianDiffusion.respaced("")
    np.testing.assert_allclose(linear.betas[[0, -1]], [1e-4, 0.02], rtol=1e-12)
    assert 3e-5 < linear.alphas_cumprod[-1] < 5e-5 and cosine.alphas_cumprod[-1] < 1e-8
    respaced = GaussianDiffusion.respaced("25", schedule="linear")  # respacing keeps the kept steps' alpha bars
    np.testing.assert_allclose(respaced.alphas_cumprod, linear.alphas_cumprod[respaced.timestep_map], rtol=1e-10)
    model = MAR.from_config({"img_size": 32, "vae_stride": 8, "vae_embed_dim": 4, "class_num": 3, "buffer_size": 2,
                             "encoder_embed_dim": 16, "encoder_depth": 1, "encoder_num_heads": 2,
                             "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2, "diffloss_d": 1,
                             "diffloss_w": 16, "noise_schedule": "linear"})
    for diffusion in (model.diffloss.train_diffusion, model.diffloss.gen_diffusion("10")):
        assert 3e-5 < diffusion.alphas_cumprod[-1] < 5e-5
    with pytest.raises(ConfigError, match="noise_schedule"):
        MAR.from_config({"noise_schedule": "quadratic"})


def test_space_timesteps_rounds_the_accumulated_stride():
    assert space_timesteps(1000, "100")[:8] == [0, 10, 20, 30, 40, 50, 61, 71]
    assert space_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, 21) != sorted({round(i * 999 / 20) for i in range(21)})  # not exact fractions
    assert space_timesteps(10, "2,3") == [0, 4, 5, 7, 9]
    for bad in ("abc", "ddim999", "2000"):
        with pytest.raises(ConfigError):
            space_timesteps(1000, bad)


# ----------------------------------------------------------------------------------------------
# Seeded training loss and sampling (the official random streams)
# ----------------------------------------------------------------------------------------------

def test_seeded_training_loss_matches_official(ema_model):
    np.random.seed(17)
    assert torch.equal(ema_model.sample_orders(2, torch.device("cpu")), REF["fwd_seed17_orders"])
    assert ema_model.mask_ratio_generator.rvs(1)[0] == pytest.approx(REF["fwd_seed17_mask_rate"].item(), rel=1e-12)
    np.random.seed(17)
    torch.manual_seed(17)
    loss, logs = ema_model.loss(REF["latents"], REF["labels"])
    assert_close(loss, REF["fwd_loss_eval_seed17"], rtol=1e-5, atol=0)
    assert logs == {"loss": loss.item()}


@pytest.mark.parametrize("name", ["s1", "s2", "s3", "s4"])
def test_seeded_samples_match_official(ema_model, monkeypatch, name):
    settings = META["samples"][name]
    calls = []
    sample = ema_model.diffloss.sample

    def recording_sample(z, temperature, cfg, *args, **kwargs):
        calls.append((z.shape[0], cfg, sample(z, temperature, cfg, *args, **kwargs)))
        return calls[-1][2]

    monkeypatch.setattr(ema_model.diffloss, "sample", recording_sample)
    np.random.seed(settings["seed"])
    assert ema_model.sample_orders(2, torch.device("cpu")).tolist() == SAMPLES[f"{name}_orders"].tolist()
    torch.manual_seed(settings["seed"])
    np.random.seed(settings["seed"])
    labels = None if settings["labels"] is None else torch.tensor(settings["labels"])
    tokens = ema_model.generate(labels, num_iter=settings["num_iter"], cfg=settings["cfg"],
                                cfg_schedule=settings["cfg_schedule"], temperature=settings["temperature"],
                                batch_size=2)
    assert tokens.shape == (2, 8, 5, 5)
    assert_close_to_largest(tokens, torch.from_numpy(SAMPLES[f"{name}_tokens"]), 1e-4)
    assert [rows for rows, _, _ in calls] == SAMPLES[f"{name}_rows_per_step"].tolist()
    np.testing.assert_allclose([cfg for _, cfg, _ in calls], SAMPLES[f"{name}_cfg_iter"], rtol=1e-6)
    first = calls[0][2]  # the guided half only: the official discarded half is never computed
    assert_close_to_largest(first, torch.from_numpy(SAMPLES[f"{name}_step0_sampled"][:len(first)]), 1e-4)


def test_generator_sampling_depends_only_on_the_generator(ema_model):
    labels = torch.tensor([3, 7, 11])

    def run(global_seed: int, generator_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)
        torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
        out = ema_model.generate(labels, generator=torch.Generator().manual_seed(generator_seed), num_iter=4,
                                 cfg=2.0, temperature=0.9, num_sampling_steps="ddim4")
        assert torch.equal(torch.get_rng_state(), torch_state)  # the global generators are untouched
        assert np.array_equal(np.random.get_state()[1], numpy_state)
        return out

    first = run(0, 5)
    assert torch.equal(first, run(123, 5))
    assert not torch.equal(first, run(0, 6))


def test_sampling_steps_are_a_sampling_knob(ema_model):
    diffloss = ema_model.diffloss
    assert diffloss.gen_diffusion("4") is diffloss.gen_diffusion(4)  # built once per step count
    assert diffloss.gen_diffusion().timestep_map == [0, 143, 285, 428, 571, 714, 856, 999]
    out = ema_model.generate(torch.tensor([1]), generator=torch.Generator().manual_seed(0), num_iter=30,
                             num_sampling_steps="4")  # more steps than tokens: the extra steps reveal nothing
    assert out.shape == (1, 8, 5, 5) and torch.isfinite(out).all()
    folder = ema_model.knob_folder_name({"num_iter": 64, "num_sampling_steps": None, "cfg": 2.9,
                                         "cfg_schedule": "linear", "temperature": 1.0})
    assert folder == "ariter64-diffsteps8-temp1.0-linearcfg2.9"


def test_bad_inputs_are_refused_with_one_line(ema_model):
    with pytest.raises(DataError, match=r"\[0, 12\)"):
        ema_model.generate(torch.tensor([12]))
    with pytest.raises(DataError, match="batch_size"):
        ema_model.generate(None)
    with pytest.raises(ConfigError, match="cfg_schedule"):
        ema_model.generate(torch.tensor([1]), cfg_schedule="cosine")
    with pytest.raises(ConfigError, match="num_sampling_steps"):
        ema_model.generate(torch.tensor([1]), num_sampling_steps="many")
    with pytest.raises(DataError, match=r"latents of shape \(B, 8, 5, 5\)"):
        ema_model.loss(torch.zeros(2, 8, 4, 4), torch.tensor([0, 1]))


# ----------------------------------------------------------------------------------------------
# Training and released architectures
# ----------------------------------------------------------------------------------------------

def test_training_loss_backpropagates_to_every_part():
    torch.manual_seed(0)
    model = MAR(img_size=64, vae_stride=16, vae_embed_dim=4, encoder_embed_dim=16, encoder_depth=1,
                encoder_num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, class_num=3,
                buffer_size=2, diffloss_d=1, diffloss_w=16, diffusion_batch_mul=2, label_drop_prob=0.5).train()
    loss, logs = model.loss(torch.randn(3, 4, 4, 4), torch.tensor([0, 1, 2]))
    loss.backward()
    assert torch.isfinite(loss) and set(logs) == {"loss"}
    for name in ("z_proj.weight", "encoder_blocks.0.attn.qkv.weight", "decoder_blocks.0.mlp.fc2.weight",
                 "mask_token", "diffusion_pos_embed_learned", "diffloss.net.final_layer.linear.weight"):
        assert model.get_parameter(name).grad is not None, name


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_models_have_the_official_parameters(name):
    with torch.device("meta"):
        model = MAR_MODELS[name]()
    assert sum(p.numel() for p in model.parameters()) == RELEASED[name]
    listing = [f"{key} [{','.join(map(str, value.shape))}] {str(value.dtype).removeprefix('torch.')}"
               for key, value in model.state_dict().items()]
    with open(os.path.join(MAR_DATA, f"{name}.txt")) as f:
        assert listing == f.read().splitlines()


def test_arch_config_builds_named_models_and_refuses_bad_heads():
    with torch.device("meta"):
        model = MAR.from_config({"model": "mar_base", "num_sampling_steps": 50})
    assert sum(p.numel() for p in model.parameters()) == RELEASED["mar_base"]
    assert model.num_sampling_steps == "50"
    with pytest.raises(ConfigError, match="encoder_num_heads"):
        MAR.from_config({"encoder_embed_dim": 100})
    with pytest.raises(ConfigError, match="arch.model"):
        MAR.from_config({"model": "mar_tiny"})
