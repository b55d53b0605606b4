"""Text-to-image RQ-Transformer: a release in the CC-3M layout against the official code's reference vectors.

tests/data/rqvae_t2i/ comes from the official kakaobrain/rq-vae-transformer code run on a tiny random pair
(16x16 images -> 4x4x3 codes of a 32-code book; a text model of width 12 with 8 text tokens of a 16384-token
vocabulary): stage2/ is the release's config.yaml and its state_dict as released; stage1/ holds the RQ-VAE's
config.yaml and every weight but the encoder's, which no vector uses (a random encoder completes the file
here); stage2_vectors.pt holds the outputs (the text logits of the first 1024 vocabulary entries only).
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch
import yaml
from torch.testing import assert_close

from common.config import load_config, read_yaml
from common.data import to_uint8
from common.errors import CheckpointError, ConfigError, DataError
from rqvae.official import load_official_rqtransformer, load_official_rqvae, official_sampling_defaults
from rqvae.stage2 import STAGE2_SCHEMA
from rqvae.transformer import RQTransformer
from rqvae.vqvae import RQVAE
from tests.helpers import DATA, ROOT

REF = os.path.join(DATA, "rqvae_t2i")
STOCHASTIC = "stochastic_codes_seed1357_T1.0_k16384_p0.7"


def write_release(folder) -> str:
    """The tiny release laid out as released (<folder>/stage1, <folder>/stage2, model.pt + config.yaml each);
    returns the folder."""
    shutil.copytree(os.path.join(REF, "stage2"), os.path.join(folder, "stage2"))
    os.makedirs(os.path.join(folder, "stage1"))
    shutil.copy(os.path.join(REF, "stage1", "config.yaml"), os.path.join(folder, "stage1", "config.yaml"))
    torch.manual_seed(0)
    state = RQVAE.from_config(read_yaml(os.path.join(REF, "stage1", "config.yaml"))["arch"]).state_dict()
    released = torch.load(os.path.join(REF, "stage1", "model_without_encoder.pt"), weights_only=True)
    assert set(state) - set(released) == {k for k in state if k.startswith(("encoder.", "quant_conv."))}
    torch.save({"epoch": 1, "state_dict": {**state, **released}}, os.path.join(folder, "stage1", "model.pt"))
    return str(folder)


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> str:
    return write_release(tmp_path_factory.mktemp("t2i_release"))


@pytest.fixture(scope="module")
def vectors():
    return torch.load(os.path.join(REF, "stage2_vectors.pt"), weights_only=True)


@pytest.fixture(scope="module")
def rqvae(release):
    return load_official_rqvae(os.path.join(release, "stage1", "model.pt")).eval()


@pytest.fixture(scope="module")
def prior(release, rqvae):
    return load_official_rqtransformer(os.path.join(release, "stage2", "model.pt"), rqvae)


# ------------------------------------------------------------------------------------------------
# The release and its numerics
# ------------------------------------------------------------------------------------------------

def test_the_release_loads_as_released(prior, release):
    assert (prior.context_length, prior.text_vocab_size, prior.num_classes, prior.null_class) == (8, 16384, 1, None)
    assert sum(p.numel() for p in prior.parameters()) == 416256
    assert prior.cond_classifier.linear.weight.shape == (16384, 12) and prior.pos_emb_cond.shape == (1, 8, 12)
    assert official_sampling_defaults(os.path.join(release, "stage2", "model.pt")) == \
        {"temperature": 1.0, "top_k": 16384, "top_p": 0.7}


@torch.no_grad()
def test_teacher_forced_image_and_text_logits(prior, vectors):
    logits, text_logits = prior.teacher_forcing(vectors["tf_codes"], vectors["tf_text"])
    assert logits.shape == (2, 4, 4, 3, 32) and text_logits.shape == (2, 7, 16384)
    assert_close(logits, vectors["tf_logits"], rtol=1e-4, atol=1e-4)
    assert_close(text_logits[..., :1024], vectors["tf_text_logits"], rtol=1e-4, atol=1e-4)
    assert torch.equal(prior(vectors["tf_codes"], vectors["tf_text"]), logits)


@torch.no_grad()
def test_no_condition_is_the_empty_caption(prior, vectors):
    logits = prior(vectors["tf_codes"], None)
    assert_close(logits, vectors["tf_logits_cond_none"], rtol=1e-4, atol=1e-4)
    assert torch.equal(logits, prior(vectors["tf_codes"], torch.zeros(2, 8, dtype=torch.long)))


@torch.no_grad()
def test_losses_weigh_the_image_and_the_caption_tokens_pads_included(prior, vectors):
    codes, text = vectors["tf_codes"], vectors["tf_text"]
    loss, logs = prior.loss(codes, text, img_weight=0.9, txt_weight=0.1)
    assert_close(logs["loss_img"], vectors["tf_loss_img_ce"], rtol=1e-5, atol=0)
    assert_close(logs["loss_txt"], vectors["tf_loss_txt_ce"], rtol=1e-5, atol=0)
    assert_close(loss, vectors["tf_loss_total_ce"], rtol=1e-5, atol=0)
    per_depth = torch.stack([logs[f"loss_d{d}"] for d in range(3)])
    assert_close(per_depth, vectors["tf_loss_img_ce_per_depth"], rtol=1e-5, atol=0)
    soft, _ = prior.loss(codes, text, vectors["tf_soft_targets_t0.5"])
    assert_close(soft, vectors["tf_loss_total_soft"], rtol=1e-5, atol=0)
    _, empty = prior.loss(codes, None)
    assert_close(empty["loss_txt"], vectors["tf_loss_txt_ce_cond_none"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("cached", [True, False])
def test_greedy_codes_of_prompts_and_of_the_empty_caption(prior, vectors, cached):
    assert torch.equal(prior.generate(vectors["greedy_text"], top_k=1, cached=cached), vectors["greedy_codes"])
    empty = torch.zeros(1, 8, dtype=torch.long)
    assert torch.equal(prior.generate(empty, top_k=[1], top_p=[1.0], cached=cached), vectors["greedy_codes_cond_none"])


def test_seeded_stochastic_codes_with_the_release_settings(prior, vectors):
    torch.manual_seed(1357)
    codes = prior.generate(vectors["stochastic_text"], temperature=1.0, top_k=16384, top_p=0.7)
    assert torch.equal(codes, vectors[STOCHASTIC])


@torch.no_grad()
def test_samples_decode_to_the_official_images(rqvae, vectors):
    for codes, prefix in ((vectors["greedy_codes"], "greedy"), (vectors[STOCHASTIC], "stochastic")):
        decoded = torch.cat([rqvae.decode_tokens(code[None]) for code in codes])  # one at a time, as officially
        if prefix == "greedy":
            assert_close(decoded, vectors["greedy_decoded"], rtol=1e-4, atol=1e-4)
        assert_close((decoded * 0.5 + 0.5).clamp(0, 1), vectors[f"{prefix}_pixels01"], rtol=1e-4, atol=1e-4)
        official_png = vectors[f"{prefix}_png_u8_nhwc"].int()  # truncated; ours rounds
        assert (to_uint8(decoded).int() - official_png).abs().max() <= 1


# ------------------------------------------------------------------------------------------------
# Configs and refusals
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, millions", [("cc3m-rqtransformer-8x8x4-650M.yaml", 654),
                                            ("cc3m-cc12m-yfcc-rqtransformer-8x8x4-3.9B.yaml", 3904)])
def test_text_to_image_configs_build_at_their_sizes(name, millions):
    path = os.path.join(ROOT, "configs", "cc3m", "stage2", name)
    config = load_config(path, STAGE2_SCHEMA)
    with torch.device("meta"):
        model = RQTransformer.from_config({**config["arch"], "vocab_size": config["dataset"]["vocab_size"]}, path)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == millions
    assert (model.context_length, model.text_vocab_size, model.block_size) == (32, 16384, (8, 8, 4))


def test_a_text_prior_refuses_class_labels(prior):
    with pytest.raises(DataError, match=r"text token ids of shape \(2, 8\).*--prompt"):
        prior.generate(torch.zeros(2, dtype=torch.long), top_k=1)


@pytest.mark.parametrize("arch, message", [
    ({"vocab_size_cond": 1}, "arch.vocab_size_cond must be the text vocabulary size"),
    ({"cfg_null_class": True}, "cfg_null_class needs a class-conditional prior"),
])
def test_text_arch_refusals(arch, message):
    config = read_yaml(os.path.join(REF, "stage2", "config.yaml"))
    with pytest.raises(ConfigError, match=message):
        RQTransformer.from_config({**config["arch"], **arch}, "config.yaml")


def test_a_release_whose_context_length_is_not_the_models_is_refused(tmp_path, rqvae):
    shutil.copytree(os.path.join(REF, "stage2"), tmp_path / "stage2")
    config = read_yaml(str(tmp_path / "stage2" / "config.yaml"))
    config["dataset"]["context_length"] = 32
    with open(tmp_path / "stage2" / "config.yaml", "w") as handle:
        yaml.safe_dump(config, handle)
    with pytest.raises(CheckpointError, match="dataset.context_length 32 .* arch.block_size_cond 8"):
        load_official_rqtransformer(str(tmp_path / "stage2" / "model.pt"), rqvae)
