"""RQ-Transformer: numerics against the official code's reference vectors, KV-cached sampling, guidance, loading.

Reference data (tests/data/rqvae/) was produced by the official kakaobrain/rq-vae-transformer code on
a tiny random pair: RQ-VAE with 32 codes of dimension 8, codes 8x8x3; RQ-Transformer of width 24 with
16 classes. stage2/rqtransformer_ffhq256_350M.txt lists the state dict of the released FFHQ model.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.testing import assert_close

from common.attention import KVCache, causal_attention
from common.config import load_config, read_yaml
from common.errors import CheckpointError, ConfigError, DataError
from rqvae.official import load_official_rqtransformer, load_official_rqvae, official_sampling_defaults
from rqvae.stage2 import STAGE2_SCHEMA
from rqvae.transformer import RQTransformer
from rqvae.vqvae import RQVAE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data", "rqvae")
STAGE1 = os.path.join(DATA, "stage1", "model.pt")
STAGE2 = os.path.join(DATA, "stage2", "model.pt")
STOCHASTIC = "stochastic_codes_seed8765_T0.8_k6_p0.85"


@pytest.fixture(scope="module")
def vectors():
    return torch.load(os.path.join(DATA, "stage2_vectors.pt"), weights_only=True)


@pytest.fixture(scope="module")
def rqvae():
    return load_official_rqvae(STAGE1).eval()


@pytest.fixture(scope="module")
def prior(rqvae):
    return load_official_rqtransformer(STAGE2, rqvae, ema=False)


@pytest.fixture(scope="module")
def prior_ema(rqvae):
    return load_official_rqtransformer(STAGE2, rqvae, ema=True)


def tiny_arch(**overrides) -> dict:
    arch = {"type": "rq-transformer", "vocab_size": 32, "block_size": [3, 3, 3], "embed_dim": 16,
            "input_embed_dim": 8, "vocab_size_cond": 5, "block_size_cond": 1, "input_emb_vqvae": True,
            "head_emb_vqvae": True, "cumsum_depth_ctx": True, "shared_tok_emb": True, "shared_cls_emb": True,
            "body": {"n_layer": 2, "block": {"n_head": 2}}, "head": {"n_layer": 1, "block": {"n_head": 2}}}
    arch.update(overrides)
    return arch


def tiny_prior(seed: int = 0, **overrides) -> RQTransformer:
    torch.manual_seed(seed)
    model = RQTransformer.from_config(tiny_arch(**overrides))
    if hasattr(model, "codebook"):
        model.codebook.normal_()
    return model.eval()


# ------------------------------------------------------------------------------------------------
# Official numerics
# ------------------------------------------------------------------------------------------------

def build_official_config_on_meta(path: str) -> RQTransformer:
    """The prior of a configs/*/stage2 file at full size, without allocating its weights."""
    config = load_config(os.path.join(REPO, path), STAGE2_SCHEMA)
    arch = {**config["arch"], "vocab_size": config["dataset"]["vocab_size"]}  # as main_stage2.py fills it
    with torch.device("meta"):
        return RQTransformer.from_config(arch, path)


def test_official_layout_matches_the_released_350M_state_dict():
    listing = {}
    with open(os.path.join(DATA, "stage2", "rqtransformer_ffhq256_350M.txt")) as f:
        for line in f:
            key, shape, _ = line.split()
            listing[key] = [int(n) for n in shape.strip("[]").split(",")]
    model = build_official_config_on_meta("configs/ffhq/stage2/ffhq256-rqtransformer-8x8x4-350M.yaml")
    state = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert state.pop("codebook") == [2048, 256]  # ours: the stage-1 codebook travels with the prior
    assert state == listing


@pytest.mark.parametrize("path, millions, classes", [
    ("ffhq/stage2/ffhq256-rqtransformer-8x8x4-350M.yaml", 355, 1),
    ("lsun-church/stage2/lsun-church256-sqgan-8x8x4-350M-simp.yaml", 370, 1),
    ("lsun-bedroom/stage2/bedroom256-rqtransformer-8x8x4-600M.yaml", 612, 1),
    ("lsun-cat/stage2/cat256-rqtransformer-8x8x4-600M.yaml", 612, 1),
    ("imagenet256/stage2/in256-rqtransformer-8x8x4-480M.yaml", 481, 1000),
    ("imagenet256/stage2/in256-rqtransformer-8x8x4-800M.yaml", 821, 1000),
    ("imagenet256/stage2/in256-rqtransformer-8x8x4-1400M.yaml", 1388, 1000),
    ("imagenet256/stage2/in256-rqtransformer-8x8x4-3800M.yaml", 3822, 1000),
])
def test_official_stage2_configs_build_the_papers_model_sizes(path, millions, classes):
    model = build_official_config_on_meta(f"configs/{path}")
    trained = sum(p.numel() for name, p in model.named_parameters())  # the frozen codebook is a buffer
    assert round(trained / 1e6) == millions
    assert model.num_classes == classes and model.block_size == (8, 8, 4)


@pytest.mark.parametrize("ema", [False, True])
@torch.no_grad()
def test_official_teacher_forced_logits(prior, prior_ema, vectors, ema):
    model = prior_ema if ema else prior
    logits = model(vectors["tf_codes"], vectors["tf_cond"])
    assert logits.shape == (2, 8, 8, 3, 32)
    assert_close(logits, vectors["tf_logits_ema" if ema else "tf_logits"], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_official_logits_without_cond_use_class_zero(prior, vectors):
    assert_close(prior(vectors["tf_codes"], None), vectors["tf_logits_cond_none"], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_official_losses(prior, vectors):
    stage1_vectors = torch.load(os.path.join(DATA, "stage1_vectors.pt"), weights_only=True)
    loss, logs = prior.loss(vectors["tf_codes"], vectors["tf_cond"])
    assert_close(loss, vectors["tf_loss_ce"], rtol=1e-5, atol=0)
    per_depth = torch.tensor([logs[f"loss_d{d}"] for d in range(3)])
    assert_close(per_depth, vectors["tf_loss_ce_per_depth"], rtol=1e-5, atol=0)
    soft_loss, _ = prior.loss(vectors["tf_codes"], vectors["tf_cond"], stage1_vectors["soft_codes_t0.7"][:2])
    assert_close(soft_loss, vectors["tf_loss_soft_t0.7"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("cached", [True, False])
def test_official_greedy_codes(prior, vectors, cached):
    assert torch.equal(prior.generate(vectors["greedy_cond"], top_k=1, cached=cached), vectors["greedy_codes"])


def test_official_greedy_codes_ema(prior_ema, vectors):
    codes = prior_ema.generate(vectors["greedy_cond"], top_k=[1], top_p=[1.0])
    assert torch.equal(codes, vectors["greedy_codes_ema"])


@pytest.mark.parametrize("cached", [True, False])
def test_official_stochastic_codes_after_the_same_seed(prior, vectors, cached):
    torch.manual_seed(8765)
    codes = prior.generate(vectors["greedy_cond"], temperature=0.8, top_k=6, top_p=0.85, cached=cached)
    assert torch.equal(codes, vectors[STOCHASTIC])


def test_greedy_samples_decode_to_the_official_images(rqvae, vectors):
    decoded = torch.cat([rqvae.decode_tokens(code[None]) for code in vectors["greedy_codes"]])
    assert_close(decoded, vectors["greedy_decoded"], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_inputs_are_the_rqvae_code_vectors(prior, rqvae, vectors):
    codes = vectors["tf_codes"]
    assert_close(F.embedding(codes, prior.codebook), rqvae.embed_codes_with_depth(codes), rtol=0, atol=0)


def test_official_sampling_defaults():
    assert official_sampling_defaults(STAGE2) == {"temperature": 1.0, "top_k": 8, "top_p": 0.95}


# ------------------------------------------------------------------------------------------------
# Official loading: refusals
# ------------------------------------------------------------------------------------------------

def copy_stage2(tmp_path, edit_ckpt=None, edit_config=None) -> str:
    directory = tmp_path / "stage2"
    directory.mkdir()
    ckpt = torch.load(STAGE2, weights_only=True)
    if edit_ckpt:
        edit_ckpt(ckpt)
    torch.save(ckpt, directory / "model.pt")
    config = read_yaml(os.path.join(DATA, "stage2", "config.yaml"))
    if edit_config:
        edit_config(config)
    with open(directory / "config.yaml", "w") as f:
        yaml.safe_dump(config, f)
    return str(directory / "model.pt")


@pytest.mark.parametrize("hparams, what", [({"n_embed": 16}, "16 codes"), ({"code_shape": [8, 8, 2]}, "[8, 8, 2]"),
                                           ({"shared_codebook": False}, "shared_codebook False")])
def test_stage1_with_another_codebook_is_refused(hparams, what):
    arch = read_yaml(os.path.join(DATA, "stage1", "config.yaml"))["arch"]
    arch["hparams"].update(hparams)
    other = RQVAE.from_config(arch)
    with pytest.raises(CheckpointError, match="shared codebook of 32 codes of dimension 8") as error:
        load_official_rqtransformer(STAGE2, other)
    assert what in str(error.value) and "stage-1 checkpoint the prior was trained with" in str(error.value)


def test_missing_ema_weights_are_reported(tmp_path, rqvae):
    path = copy_stage2(tmp_path, edit_ckpt=lambda ckpt: ckpt.pop("state_dict_ema"))
    with pytest.raises(CheckpointError, match="has no 'state_dict_ema'.*without --ema"):
        load_official_rqtransformer(path, rqvae, ema=True)
    assert load_official_rqtransformer(path, rqvae, ema=False) is not None


def test_mismatched_weights_list_the_keys(tmp_path, rqvae):
    def rename(ckpt):
        ckpt["state_dict"]["extra.weight"] = ckpt["state_dict"].pop("head_mlp.weight")

    path = copy_stage2(tmp_path, edit_ckpt=rename)
    with pytest.raises(CheckpointError, match="missing keys: head_mlp.weight; unexpected keys: extra.weight"):
        load_official_rqtransformer(path, rqvae)


def test_wrong_files_are_refused(tmp_path, rqvae):
    with pytest.raises(CheckpointError, match="not an official RQ-Transformer stage-2 checkpoint"):
        load_official_rqtransformer(STAGE1, rqvae)
    path = copy_stage2(tmp_path)
    os.remove(os.path.join(os.path.dirname(path), "config.yaml"))
    with pytest.raises(CheckpointError, match="put it at .*config.yaml"):
        load_official_rqtransformer(path, rqvae)


def test_class_weights_under_a_text_config_are_refused(tmp_path, rqvae):
    # block_size_cond 32 makes a text model (tests/test_t2i_rqtransformer.py), which these class weights do not fit
    path = copy_stage2(tmp_path, edit_config=lambda config: config["arch"].update(block_size_cond=32))
    with pytest.raises(CheckpointError, match=r"missing keys: cond_classifier.*pos_emb_cond \(1, 1, 24\) vs "
                                              r"\(1, 32, 24\)"):
        load_official_rqtransformer(path, rqvae)


# ------------------------------------------------------------------------------------------------
# KV-cached sampling
# ------------------------------------------------------------------------------------------------

def test_cached_attention_equals_full_causal_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 7, 5).unbind(0)  # (B, n_head, T, head_dim)
    full = causal_attention(q, k, v)
    scores = (q @ k.transpose(-1, -2)) / 5 ** 0.5
    scores = scores.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
    assert_close(full, scores.softmax(-1) @ v)
    cache = KVCache(max_len=7)
    pieces = [causal_attention(q[:, :, :3], k[:, :, :3], v[:, :, :3], cache)]  # prefill
    pieces.append(causal_attention(q[:, :, 3:5], k[:, :, 3:5], v[:, :, 3:5], cache))  # two at once, after a past
    pieces += [causal_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], cache) for t in (5, 6)]
    assert_close(torch.cat(pieces, dim=2), full)
    buffer = cache.keys
    cache.reset()
    causal_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], cache)
    assert cache.keys is buffer and cache.length == 1  # allocated once, reused
    with pytest.raises(RuntimeError, match="cannot take position 7"):
        causal_attention(q, k, v, cache)


@pytest.mark.parametrize("variant", [
    {},
    {"shared_cls_emb": False, "head": {"n_layer": 2, "block": {"n_head": 4, "gelu": "v2"}}},
    {"input_emb_vqvae": False, "shared_tok_emb": False},
    {"input_emb_vqvae": False, "head_emb_vqvae": False},
    {"vocab_size_cond": 1, "cumsum_depth_ctx": False},
])
def test_cached_and_uncached_sampling_draw_the_same_codes(variant):
    model = tiny_prior(**variant)
    cond = torch.tensor([0, 0, 0, 0]) if variant.get("vocab_size_cond") == 1 else torch.tensor([0, 1, 4, 2])
    torch.manual_seed(5)
    cached = model.generate(cond, temperature=1.3, top_k=[20, 10, 32], top_p=0.9)
    torch.manual_seed(5)
    uncached = model.generate(cond, temperature=1.3, top_k=[20, 10, 32], top_p=0.9, cached=False)
    assert cached.shape == (4, 3, 3, 3) and cached.dtype == torch.int64
    assert torch.equal(cached, uncached)
    assert len(cached.unique()) > 3  # a real draw, not a constant
    logits = model(cached, cond)  # greedy codes are the argmax of their own teacher-forced logits
    greedy = model.generate(cond, top_k=1)
    assert torch.equal(model(greedy, cond).argmax(-1), greedy)
    assert logits.shape == (4, 3, 3, 3, 32)


def test_token_table_variants_use_the_official_names():
    names = set(tiny_prior(input_emb_vqvae=False, shared_tok_emb=False, shared_cls_emb=False).state_dict())
    assert {"tok_emb.weight", "tok_emb.offsets", "head_mlp.weight", "codebook"} <= names
    model = tiny_prior(input_emb_vqvae=False, head_emb_vqvae=False, shared_cls_emb=False)
    assert model.tok_emb.weight.shape == (32, 16) and not hasattr(model, "codebook")
    assert model.classifier.linear.weight.shape == (3, 16, 32) and model.classifier.linear.bias.shape == (3, 32)


def test_generator_argument_makes_sampling_reproducible():
    model = tiny_prior()
    cond = torch.tensor([1, 2])
    first = model.generate(cond, generator=torch.Generator().manual_seed(7))
    again = model.generate(cond, generator=torch.Generator().manual_seed(7))
    other = model.generate(cond, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_a_saved_prior_samples_without_the_tokenizer():
    model = tiny_prior()
    rebuilt = RQTransformer.from_config(tiny_arch()).eval()
    rebuilt.load_state_dict(model.state_dict())  # the codebook is part of the state dict
    cond = torch.tensor([3, 1])
    assert torch.equal(rebuilt.generate(cond, top_k=1), model.generate(cond, top_k=1))


# ------------------------------------------------------------------------------------------------
# Classifier-free guidance (ours)
# ------------------------------------------------------------------------------------------------

def test_guided_greedy_codes_are_the_argmax_of_mixed_logits():
    model = tiny_prior(cfg_null_class=True)
    assert model.cond_emb.weight.shape == (6, 16)  # 5 classes + the null class
    cond = torch.tensor([0, 3, 4])
    codes = model.generate(cond, top_k=1, cfg_scale=2.5)
    assert torch.equal(codes, model.generate(cond, top_k=1, cfg_scale=2.5, cached=False))
    with torch.no_grad():
        cond_logits, uncond_logits = model(codes, cond), model(codes, torch.full_like(cond, 5))
    assert torch.equal((uncond_logits + 2.5 * (cond_logits - uncond_logits)).argmax(-1), codes)
    assert not torch.equal(codes, model.generate(cond, top_k=1))


def test_cfg_scale_one_runs_only_the_conditional_batch():
    model = tiny_prior(cfg_null_class=True)
    batches = []
    model.body_transformer.register_forward_hook(lambda module, args, out: batches.append(out.shape[0]))
    cond = torch.tensor([1, 2])
    torch.manual_seed(0)
    unguided = model.generate(cond, temperature=1.5)
    assert set(batches) == {2}
    batches.clear()
    torch.manual_seed(0)
    model.generate(cond, temperature=1.5, cfg_scale=3.0)
    assert set(batches) == {4}
    torch.manual_seed(0)
    assert torch.equal(model.generate(cond, temperature=1.5, cfg_scale=1.0), unguided)


def test_class_dropout_trains_the_null_class():
    model = tiny_prior(cfg_null_class=True, class_dropout=1.0)
    codes = torch.randint(0, 32, (2, 3, 3, 3))
    with torch.no_grad():
        null_logits = model(codes, torch.tensor([5, 5]))
        model.train()
        for block in model.modules():  # keep dropout layers quiet to compare numbers
            if isinstance(block, torch.nn.Dropout):
                block.p = 0.0
        assert_close(model(codes, torch.tensor([0, 1])), null_logits)


def test_guidance_needs_a_null_class():
    with pytest.raises(ConfigError, match="--cfg-scale 2.0 needs a prior trained for classifier-free guidance"):
        tiny_prior().generate(torch.tensor([1]), cfg_scale=2.0)
    with pytest.raises(ConfigError, match="class_dropout must be in \\[0, 1\\] and needs arch.cfg_null_class"):
        tiny_prior(class_dropout=0.1)
    with pytest.raises(ConfigError, match="cfg_null_class needs a class-conditional prior"):
        tiny_prior(cfg_null_class=True, vocab_size_cond=1)


# ------------------------------------------------------------------------------------------------
# Training and bad input
# ------------------------------------------------------------------------------------------------

def test_loss_trains_the_transformer_not_the_codebook():
    model = tiny_prior().train()
    codebook = model.codebook.clone()
    codes, cond = torch.randint(0, 32, (4, 3, 3, 3)), torch.randint(0, 5, (4,))
    loss, logs = model.loss(codes, cond)
    loss.backward()
    assert set(logs) == {"loss", "loss_d0", "loss_d1", "loss_d2"}
    assert all(p.grad is not None for p in model.parameters())
    assert torch.equal(model.codebook, codebook) and not model.codebook.requires_grad
    one_hot = F.one_hot(codes, 32).float()
    soft_loss, _ = model.eval().loss(codes, cond, soft_targets=one_hot)
    hard_loss, _ = model.loss(codes, cond)
    assert_close(soft_loss, hard_loss, rtol=1e-5, atol=1e-5)  # equal but for the official +1e-7


def test_bad_input_is_refused_clearly():
    model = tiny_prior()
    with pytest.raises(DataError, match=r"codes must be an integer tensor \(B, 3, 3, 3\)"):
        model.check_codes(torch.zeros(2, 3, 3, 2, dtype=torch.long))
    with pytest.raises(DataError, match=r"codes must lie in \[0, 32\)"):
        model.check_codes(torch.full((2, 3, 3, 3), 40))
    with pytest.raises(DataError, match=r"class labels must lie in \[0, 5\)"):
        model.generate(torch.tensor([7]))
    with pytest.raises(DataError, match="generate needs class labels cond of shape"):
        model.generate(None)
    with pytest.raises(ConfigError, match="--top-k must be >= 1, got 0"):
        model.generate(torch.tensor([1]), top_k=0)
    with pytest.raises(ConfigError, match=r"--top-p takes one value or one per depth \(3\)"):
        model.generate(torch.tensor([1]), top_p=[0.9, 0.8])


@pytest.mark.parametrize("overrides, message", [
    ({"vocab_size": None}, "arch.vocab_size is missing"),
    ({"vocab_size": [32, 16, 32]}, "arch.vocab_size must be one codebook size"),
    ({"block_size": [8, 8]}, "arch.block_size must be"),
    ({"input_embed_dim": None}, "arch.input_embed_dim"),
    ({"body": {"n_layer": 1, "block": {"n_head": 2, "embed_dim": 8}}}, "arch.body.block.embed_dim 8 must equal"),
    ({"head": {"n_layer": 1, "block": {"n_head": 3}}}, "multiple of n_head 3"),
    ({"unknown": 1}, "unknown key 'arch.unknown'"),
])
def test_bad_arch_is_refused_clearly(overrides, message):
    with pytest.raises(ConfigError, match=message):
        RQTransformer.from_config(tiny_arch(**overrides))
