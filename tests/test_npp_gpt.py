"""LlamaGen's GPT with next-patch prediction, against the official code's outputs (tests/data/npp/).

The official tiny GPT: width 48, 3 layers, 4 heads, 128 codes, 12 classes, 12x12 codes, saved by the
NPP training script after 8 steps (`{"model", "optimizer", "steps", "args"}`).
`llamagen_gpt_B.txt` lists the state dict of the released GPT-B.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.testing import assert_close

from common.attention import KVCache
from common.checkpoint import load_file
from common.errors import CheckpointError, ConfigError, DataError
from common.rope import rope_2d_table
from common.sampling import sampling_probs
from methods import load_prior, load_tokenizer
from npp.gpt import GPT, average_patches, patch_targets
from npp.official import gpt_arch_from_state, load_official_gpt, official_vq_state, vq_arch_from_state
from npp.schema import GPT_PRESETS
from scripts import sample as sample_script
from tests.helpers import DATA, refused_in_process

NPP_DATA = os.path.join(DATA, "npp")
CKPT = os.path.join(NPP_DATA, "gpt_tiny_c2i.pt")
TEACHER = dict(np.load(os.path.join(NPP_DATA, "gpt_teacher_forced.npz")))
GENERATED = dict(np.load(os.path.join(NPP_DATA, "gpt_generate.npz")))
UNITS = dict(np.load(os.path.join(NPP_DATA, "units.npz")))


@pytest.fixture(scope="module")
def gpt():
    return load_official_gpt(CKPT, n_head=4)[0]


def test_official_file_loads_with_its_training_args(gpt):
    _, arch = load_official_gpt(CKPT, n_head=4)
    assert arch == {"type": "llamagen-gpt", "dim": 48, "n_head": 4, "vocab_size": 128, "n_layer": 3,
                    "ffn_hidden": 144, "num_classes": 12, "image_tokens": 144}  # 24 px / downsample 2, from args
    assert not gpt.training and gpt.grid == 12


@pytest.mark.parametrize("side", [1, 2, 4])
@torch.no_grad()
def test_official_next_patch_logits_and_losses(gpt, side):
    codes, labels = torch.from_numpy(TEACHER["codes"]), torch.from_numpy(TEACHER["labels"])  # label 12: null
    logits = gpt(codes, labels, patch_side=side)
    assert logits.shape == (2, 144 // side ** 2, 128)
    assert_close(logits, torch.from_numpy(TEACHER[f"logits_p{side}"]), rtol=0, atol=1e-5)
    official_targets = torch.from_numpy(TEACHER[f"targets_p{side}"])  # (B, N) at side 1, else (B, N, P)
    assert torch.equal(patch_targets(codes, 12, side), official_targets.reshape(2, 144 // side ** 2, side ** 2))
    loss, logs = gpt.loss(codes, labels, patch_side=side)
    assert loss.item() == pytest.approx(float(TEACHER[f"loss_p{side}"]), rel=1e-6) and logs["loss"] == loss.item()


@torch.no_grad()
def test_cached_steps_equal_the_full_forward_and_the_official_last_logits(gpt):
    codes, labels = torch.from_numpy(TEACHER["codes"]), torch.from_numpy(TEACHER["labels"])
    sequence = torch.cat([gpt.cls_embedding(labels), gpt.tok_embeddings(codes)], dim=1)  # 145 positions
    rope = gpt.rope(12, codes.device)
    full = gpt.transformer(sequence, rope)
    caches = [KVCache(145) for _ in gpt.layers]
    stepped = torch.cat([gpt.transformer(sequence[:, t:t + 1], rope[t:t + 1], caches) for t in range(145)], dim=1)
    assert_close(stepped, full, rtol=0, atol=1e-5)
    assert_close(full[:, :144], torch.from_numpy(TEACHER["logits_p1"]), rtol=0, atol=1e-5)
    assert_close(full[:, -1], torch.from_numpy(TEACHER["eval_logits_last"]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name, knobs", [
    ("codes_greedy_cfg1", {"top_k": 1}),
    ("codes_greedy_cfg1.5", {"top_k": 1, "cfg_scale": 1.5}),
    ("codes_greedy_cfg3_interval20", {"top_k": 1, "cfg_scale": 3.0, "cfg_interval": 20}),
    ("codes_stochastic_cfg1.5_seed777", {"top_k": 30, "top_p": 0.8, "temperature": 0.9, "cfg_scale": 1.5}),
])
def test_generated_codes_equal_the_official_sampler(gpt, name, knobs):
    torch.manual_seed(777)  # what the official run seeded right before its stochastic call
    codes = gpt.generate(torch.from_numpy(GENERATED["labels"]), **knobs)
    assert codes.shape == (2, 12, 12) and torch.equal(codes.flatten(1), torch.from_numpy(GENERATED[name]).long())


@torch.no_grad()
def test_greedy_samples_decode_to_the_official_images(gpt):
    vq, _ = load_tokenizer(os.path.join(NPP_DATA, "vq_tiny.pt"))
    codes = gpt.generate(torch.from_numpy(GENERATED["labels"]), top_k=1, cfg_scale=1.5)
    images = vq.decode_tokens(codes)
    pixels = (127.5 * images + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # LlamaGen's
    for pixel, label in zip(pixels, (0, 7)):
        official = np.asarray(Image.open(os.path.join(NPP_DATA, f"sample_greedy_cfg1.5_label{label}.png")))
        assert np.array_equal(pixel, official)


def test_cached_and_uncached_sampling_draw_the_same_codes(gpt):
    labels = torch.tensor([1, 4])
    runs = []
    for cached in (True, False):
        generator = torch.Generator().manual_seed(3)
        runs.append(gpt.generate(labels, cfg_scale=2.0, top_k=40, top_p=0.9, temperature=1.1, generator=generator,
                                 cached=cached))
    assert torch.equal(runs[0], runs[1])


def test_guidance_at_scale_one_is_the_unguided_sampler(gpt):
    labels = torch.tensor([3, 3, 9])
    torch.manual_seed(1)
    plain = gpt.generate(labels, top_k=20)
    torch.manual_seed(1)
    assert torch.equal(gpt.generate(labels, top_k=20, cfg_scale=1.0, cfg_interval=5), plain)


def test_units_rope_patches_and_filters():
    for name, grid, head_dim in (("rope_grid16_hd64_cls1", 16, 64), ("rope_grid12_hd12_cls1", 12, 12)):
        assert torch.equal(rope_2d_table(grid, head_dim), torch.from_numpy(UNITS[name]))
    embeddings = torch.from_numpy(UNITS["patchify_in"])
    for side in (2, 4):
        assert_close(average_patches(embeddings, 12, side), torch.from_numpy(UNITS[f"patchify_p{side}"]),
                     rtol=1e-6, atol=0)
        assert torch.equal(patch_targets(torch.arange(144)[None], 12, side),
                           torch.from_numpy(UNITS[f"target_patchify_p{side}"]))
    logits = torch.from_numpy(UNITS["filter_in"])
    for k, p in ((0, 0.8), (7, 1.0), (20, 0.6), (1, 1.0)):  # LlamaGen's top-k 0 means off
        probs = sampling_probs(logits, 1.3, k or None, p)
        assert_close(probs, torch.from_numpy(UNITS[f"probs_k{k}_p{p}_t1.3"]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name, parameters", [("GPT-B", 110_888_448), ("GPT-L", 342_910_976),
                                              ("GPT-XL", 774_699_520), ("GPT-XXL", 1_410_972_672),
                                              ("GPT-XXXL", 3_893_027_840), ("GPT-1B", 1_199_616_000),
                                              ("GPT-3B", 3_096_659_200), ("GPT-7B", 6_614_589_440)])
def test_presets_build_the_released_sizes(name, parameters):
    with torch.device("meta"):
        model = GPT.from_config({"type": "llamagen-gpt", "vocab_size": 16384, "image_tokens": 256, **GPT_PRESETS[name]})
    assert sum(p.numel() for p in model.parameters()) == parameters
    if name == "GPT-B":
        listing = [f"{k} [{','.join(map(str, v.shape))}] {str(v.dtype).removeprefix('torch.')}"
                   for k, v in model.state_dict().items()]
        with open(os.path.join(NPP_DATA, "llamagen_gpt_B.txt")) as f:
            assert sorted(listing) == sorted(f.read().splitlines())


@pytest.mark.parametrize("dim, n_layer, n_head", [(768, 12, 12), (1536, 48, 24), (3200, 24, 32), (4096, 32, 32),
                                                  (512, 8, 8)])
def test_heads_of_a_file_without_args_come_from_the_preset_of_its_shape(dim, n_layer, n_head):
    """FSDP-saved releases (c2i_XXL_384.pt, c2i_3B_384.pt) are bare state dicts: GPT-3B's heads are 100 wide,
    GPT-7B's 128; a width no preset has gets heads of 64."""
    def weight(*shape):
        return torch.empty(shape, device="meta")
    state = {"tok_embeddings.weight": weight(16384, dim), "cls_embedding.embedding_table.weight": weight(1001, dim),
             "output.weight": weight(16384, dim), "layers.0.feed_forward.w1.weight": weight(4 * dim, dim),
             **{f"layers.{i}.attention.wqkv.weight": weight(3 * dim, dim) for i in range(n_layer)}}
    arch = gpt_arch_from_state(state, "c2i.pt")
    assert (arch["dim"], arch["n_layer"], arch["n_head"]) == (dim, n_layer, n_head)


def tiny_vq_at(tmp_path, size: int):
    """The tiny VQ (downsampling 2) built for `size` px images through a config, as --config gives it."""
    state = official_vq_state(load_file(os.path.join(NPP_DATA, "vq_tiny.pt")))
    config = tmp_path / f"vq_{size}.yaml"
    config.write_text(yaml.safe_dump({"dataset": {"type": "imagenet", "resolution": size},
                                      "arch": vq_arch_from_state(state, "vq_tiny.pt", image_size=size)}))
    return load_tokenizer(os.path.join(NPP_DATA, "vq_tiny.pt"), str(config))[0], str(config)


def test_official_gpt_without_args_takes_the_tokenizers_grid_and_its_released_size_is_checked(tmp_path, capsys):
    """As the official sampler builds the GPT and the VQ at one --image-size: a file without `args` gets the
    tokenizer's grid; a grid other than the tokenizer's (from `args`, or the size a released name states) is
    refused in one line."""
    torch.manual_seed(0)
    state = GPT(dim=64, n_layer=2, n_head=1, vocab_size=128, num_classes=12, image_tokens=16).state_dict()
    torch.save(state, tmp_path / "c2i_tiny.pt")
    torch.save(state, tmp_path / "c2i_T_48.pt")  # LlamaGen's naming: trained at 48 px, 24x24 codes
    torch.save({"model": state, "args": argparse.Namespace(image_size=24, downsample_size=2)}, tmp_path / "args.pt")
    vq24, _ = tiny_vq_at(tmp_path, 24)
    vq48, config48 = tiny_vq_at(tmp_path, 48)
    assert load_prior(str(tmp_path / "c2i_tiny.pt"), vq24)[0].grid == 12
    assert load_prior(str(tmp_path / "c2i_tiny.pt"), vq48)[0].grid == 24
    assert load_prior(str(tmp_path / "c2i_T_48.pt"), vq48)[0].grid == 24
    assert load_prior(str(tmp_path / "args.pt"), vq24)[0].grid == 12
    with pytest.raises(CheckpointError, match=r"c2i_T_48.pt: a GPT of 24x24 codes \(48 px\) and the tokenizer \(-v\) "
                                              r"makes 12x12 codes; give the tokenizer at 48 px: --image-size 48 "
                                              r"\(LlamaGen's flag\), or --config with arch.image_size: 48$"):
        load_prior(str(tmp_path / "c2i_T_48.pt"), vq24)
    with pytest.raises(CheckpointError, match=r"a GPT of 12x12 codes \(24 px\) and the tokenizer \(-v\) makes 24x24"):
        load_prior(str(tmp_path / "args.pt"), vq48)
    line = refused_in_process(capsys, sample_script.main, [
        "-v", os.path.join(NPP_DATA, "vq_tiny.pt"), "-a", str(tmp_path / "c2i_T_48.pt"), "--classes", "1",
        "--output", str(tmp_path / "samples")])
    assert line.startswith("CheckpointError: ") and "give the tokenizer at 48 px" in line
    assert not os.path.exists(tmp_path / "samples")
    for name, tokenizer_at_48 in (("config", ["--config", config48]), ("flag", ["--image-size", "48"])):
        sample_script.main(["--vq-ckpt", os.path.join(NPP_DATA, "vq_tiny.pt"), *tokenizer_at_48, "--gpt-ckpt",
                            str(tmp_path / "c2i_T_48.pt"), "--classes", "1", "--top-k", "1", "--output",
                            str(tmp_path / name)])
        assert np.load(tmp_path / name / "codes.npy").shape == (1, 24, 24)
        assert Image.open(tmp_path / name / "00000.png").size == (48, 48)
    assert np.array_equal(np.load(tmp_path / "config" / "codes.npy"), np.load(tmp_path / "flag" / "codes.npy"))
    capsys.readouterr()  # the progress bars of the runs above
    line = refused_in_process(capsys, sample_script.main, [
        "-v", os.path.join(NPP_DATA, "vq_tiny.pt"), "--image-size", "47", "-a", str(tmp_path / "c2i_T_48.pt"),
        "--output", str(tmp_path / "samples")])
    assert line == ("ConfigError: --image-size 47: the tokenizer works at multiples of its downsampling factor 2")


def test_training_step_learns_and_drops_classes():
    torch.manual_seed(0)
    model = GPT.from_config({"type": "llamagen-gpt", "dim": 32, "n_layer": 2, "n_head": 2, "vocab_size": 16,
                             "num_classes": 3, "image_tokens": 16, "class_dropout_prob": 0.5}).train()
    assert model.output.weight.abs().sum() == 0  # LlamaGen zero-initialises the output layer
    codes = torch.randint(0, 16, (8, 4, 4))
    labels = torch.randint(0, 3, (8,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        loss, _ = model.loss(codes, labels, patch_side=2 if step < 10 else 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[10] - 0.3  # token-level loss falls on a fixed batch
    dropped = model.cls_embedding(torch.zeros(1000, dtype=torch.long))[:, 0]
    null = model.cls_embedding.embedding_table.weight[3]
    share = (dropped == null).all(-1).float().mean().item()
    assert 0.4 < share < 0.6


def test_bad_input_is_refused(gpt, tmp_path):
    with pytest.raises(DataError, match="class labels"):
        gpt.generate(torch.tensor([13]))
    with pytest.raises(ConfigError, match=r"\(side 5\) do not tile"):
        gpt.check_patch_side(5)
    with pytest.raises(DataError, match="codes must be integers"):
        gpt.check_codes(torch.zeros(1, 100, dtype=torch.long))
    with pytest.raises(ConfigError, match="--top-k must be >= 1"):
        gpt.generate(torch.tensor([0]), top_k=0)
    torch.save({"model": {"encoder.conv_in.weight": torch.zeros(1)}}, tmp_path / "not_gpt.pt")
    with pytest.raises(CheckpointError, match="not an official LlamaGen / NPP GPT"):
        load_official_gpt(str(tmp_path / "not_gpt.pt"))
    state = load_file(CKPT)["model"]
    torch.save(state, tmp_path / "bare_tiny.pt")  # no args: the tiny width has no released head count
    with pytest.raises(CheckpointError, match=r"give its number of attention heads \(n_head=\)"):
        load_official_gpt(str(tmp_path / "bare_tiny.pt"))
    assert load_official_gpt(str(tmp_path / "bare_tiny.pt"), n_head=4, image_tokens=144)[1]["n_layer"] == 3
    with pytest.raises(ConfigError, match="arch.image_tokens must be a square"):
        GPT.from_config({"type": "llamagen-gpt", "dim": 32, "n_layer": 1, "n_head": 2, "image_tokens": 15,
                         "vocab_size": 16})
    with pytest.raises(ConfigError, match="arch.vocab_size is missing"):
        GPT.from_config({"type": "llamagen-gpt", "dim": 32, "n_layer": 1, "n_head": 2, "image_tokens": 16})

