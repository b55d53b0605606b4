"""Every prior on every discrete tokenizer: the RQ-Transformer and the GPT (with and without next-patch stages) on
RQ-VAE, Open-MAGVIT2 and LlamaGen VQ codes, trained through main_stage2.py and sampled with scripts/sample.py.

The tokenizers are tiny, random and untrained (16 px images -> 4x4 codes; the RQ-VAE's have depth 4), saved once
as our checkpoints. The conventions (common/code_view.py): codes without depth are (h, w, 1) to the
RQ-Transformer; residual codes of depth s * s are an (h s, w s) grid to the GPT, one position per s x s block.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

import main_stage2
from common.checkpoint import save_checkpoint
from common.code_view import CodeView, view_for
from common.config import read_yaml
from common.data import to_uint8
from common.errors import CheckpointError, DataError
from common.llamagen_codes import open_codes
from common.token_cache import write_meta, write_shard
from methods import TOKENIZERS, load_prior, load_tokenizer
from npp.gpt import GPT
from scripts import sample
from tests.helpers import refused_in_process, train_records

COMMON = ["dataset.resolution=16", "dataset.num_samples=16", "experiment.batch_size=8", "experiment.epochs=2",
          "experiment.eval_batches=1", "experiment.log_every=1", "--device", "cpu"]
RQ_TRANSFORMER = ["-m", "configs/shapes/stage2/rqtransformer.yaml", "arch.embed_dim=16", "arch.body.n_layer=1",
                  "arch.head.n_layer=1", "arch.body.block.n_head=2", "arch.head.block.n_head=2"]
OWN_EMBEDDINGS = ["arch.input_emb_vqvae=false", "arch.head_emb_vqvae=false", "loss.type=cross_entropy"]
GPT_PRIOR = ["-m", "configs/shapes/stage2/npp-gpt.yaml", "arch.dim=16", "arch.n_layer=1", "arch.n_head=2",
             "arch.multiple_of=16", "experiment.sample.top_k=8"]
PRIORS = {  # name: (run folder, arguments, patch size of each of the 4 steps or None)
    "rq-transformer": ("rqtransformer", RQ_TRANSFORMER, None),
    "gpt-next-patch": ("npp-gpt", [*GPT_PRIOR, "npp.patch_level=2"], [4, 4, 1, 1]),
    "gpt-next-token": ("npp-gpt", [*GPT_PRIOR, "npp.patch_level=1"], [1, 1, 1, 1]),
}
# the prior's code grid on each tokenizer's 4x4 codes (vocabulary: 32 RQ-VAE codes, 2^6 LFQ codes, 64 VQ codes)
PRIOR_CODES = {("rq-vae", "rq-transformer"): (4, 4, 4), ("lfq", "rq-transformer"): (4, 4, 1),
               ("vq16", "rq-transformer"): (4, 4, 1), ("rq-vae", "gpt"): (8, 8), ("lfq", "gpt"): (4, 4),
               ("vq16", "gpt"): (4, 4)}


def tiny_arch(kind: str, **rq_hparams) -> dict:
    """The arch section of a tiny 16 px tokenizer of `kind`, from its shapes config."""
    if kind == "rq-vae":
        arch = read_yaml("configs/shapes/stage1/rqvae.yaml")["arch"]
        arch["hparams"].update({"embed_dim": 16, "n_embed": 32, "latent_shape": [4, 4, 16], "code_shape": [4, 4, 4],
                                **rq_hparams})
        arch["ddconfig"].update(z_channels=16, resolution=16, attn_resolutions=[])
        return arch
    if kind == "lfq":
        arch = read_yaml("configs/shapes/stage1/lfq.yaml")["arch"]
        arch["ddconfig"].update(z_channels=6)
        return {**arch, "image_size": 16, "n_embed": 64, "embed_dim": 6}
    arch = read_yaml("configs/shapes/stage1/vq16.yaml")["arch"]
    return {**arch, "image_size": 16, "codebook_size": 64, "z_channels": 32}


def save_tokenizer(path: str, kind: str, **rq_hparams) -> str:
    """A random tokenizer saved as our stage-1 checkpoint."""
    torch.manual_seed(0)
    config = {"arch": tiny_arch(kind, **rq_hparams), "dataset": {"type": "shapes", "resolution": 16}}
    model = TOKENIZERS[kind].build(config["arch"])
    save_checkpoint(path, {"config": config, "kind": kind, "model": model.state_dict()})
    return path


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {kind: save_tokenizer(str(root / f"{kind}.pt"), kind) for kind in ("rq-vae", "lfq", "vq16")}


@pytest.mark.parametrize("prior", list(PRIORS))
@pytest.mark.parametrize("kind", ["rq-vae", "lfq", "vq16"])
def test_prior_trains_and_samples_on_the_tokenizer(tokenizers, tmp_path, capsys, kind, prior):
    run_name, arguments, patch_sizes = PRIORS[prior]
    own = OWN_EMBEDDINGS if prior == "rq-transformer" and kind != "rq-vae" else []
    codes_shape = PRIOR_CODES[kind, prior.split("-")[0] if prior.startswith("gpt") else prior]
    block = [f"arch.block_size=[{','.join(map(str, codes_shape))}]"] if prior == "rq-transformer" else []
    main_stage2.main([*arguments, "-r", str(tmp_path), "-v", tokenizers[kind], *COMMON, *own, *block])
    run = tmp_path / run_name
    records = train_records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in records)
    if patch_sizes:
        assert [r["patch_size"] for r in records] == patch_sizes
    assert (run / "images" / "epoch0002.png").is_file()  # the training preview decoded its samples

    out = tmp_path / "samples"
    sample.main(["-v", tokenizers[kind], "-a", str(run / "last.pt"), "--classes", "1", "4", "--device", "cpu",
                 "--output", str(out)])
    codes = torch.from_numpy(np.load(out / "codes.npy"))
    assert tuple(codes.shape) == (2, *codes_shape)
    tokenizer, _ = load_tokenizer(tokenizers[kind])
    prior_model, _, _ = load_prior(str(run / "last.pt"), tokenizer)
    view = view_for(tokenizer, prior_model)
    expected = to_uint8(view.decode_tokens(codes).clamp(-1, 1))  # the prior's codes, decoded in the tokenizer's layout
    for i in range(2):
        assert np.array_equal(np.asarray(Image.open(out / f"{i:05d}.png")), expected[i].numpy())
    if kind == "vq16":  # its codes follow the image size; the prior's grid does not
        capsys.readouterr()
        line = refused_in_process(capsys, sample.main, ["-v", tokenizers[kind], "-a", str(run / "last.pt"),
                                                        "--image-size", "32", "--output", str(tmp_path / "at32")])
        assert line.endswith("the given stage-1 model makes 64 codes of shape [8, 8, 1]" if prior == "rq-transformer"
                             else "--image-size 32: at that size the tokenizer makes codes of shape [8, 8] and the "
                                  "prior samples [4, 4]; give the size it was trained at (16 px)"), line


def test_layouts_place_every_code_and_decode_as_the_tokenizer(tokenizers):
    rqvae, _ = load_tokenizer(tokenizers["rq-vae"])
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    codes = rqvae.encode_tokens(images)  # (2, 4, 4, 4)
    folded = CodeView(rqvae, rank=2)
    grid = folded.encode_tokens(images)
    assert grid.shape == (2, 8, 8) and folded.code_shape == (8, 8)
    for i, j, d in [(0, 0, 0), (1, 2, 1), (3, 1, 2), (2, 3, 3)]:  # depth d of (i, j) at (2i + d // 2, 2j + d % 2)
        assert torch.equal(grid[:, 2 * i + d // 2, 2 * j + d % 2], codes[:, i, j, d])
    assert torch.equal(folded.restore(grid), codes)
    assert torch.equal(folded.decode_tokens(grid), rqvae.decode_tokens(codes))

    vq, _ = load_tokenizer(tokenizers["vq16"])
    with_depth = CodeView(vq, rank=3)
    vq_codes = vq.encode_tokens(images)
    assert torch.equal(with_depth.encode_tokens(images), vq_codes.unsqueeze(-1)) and with_depth.code_shape == (4, 4, 1)
    assert torch.equal(with_depth.decode_tokens(vq_codes.unsqueeze(-1)), vq.decode_tokens(vq_codes))


# ----------------------------------------------------------------------------------------------
# Bad input: one line naming the file
# ----------------------------------------------------------------------------------------------

def test_a_vocabulary_other_than_the_codebook_is_refused(tokenizers, tmp_path, capsys):
    gpt_config, rq_config = GPT_PRIOR[1], RQ_TRANSFORMER[1]
    line = refused_in_process(capsys, main_stage2.main, [*GPT_PRIOR, "-r", str(tmp_path), "-v", tokenizers["vq16"],
                                                         *COMMON, "arch.vocab_size=99"])
    assert gpt_config in line and "arch.vocab_size 99" in line and "64" in line
    line = refused_in_process(capsys, main_stage2.main, [*RQ_TRANSFORMER, "-r", str(tmp_path), "-v",
                                                         tokenizers["lfq"], *COMMON, *OWN_EMBEDDINGS,
                                                         "arch.block_size=[4,4,1]", "arch.vocab_size=99"])
    assert rq_config in line and "arch.vocab_size 99" in line and "64-entry codebook" in line
    assert not (tmp_path / "npp-gpt").exists() and not (tmp_path / "rqtransformer").exists()

    # a GPT trained on the 64-entry VQ, sampled with the 32-entry RQ-VAE
    arch = {"type": "llamagen-gpt", "dim": 16, "n_layer": 1, "n_head": 2, "vocab_size": 64, "num_classes": 10,
            "image_tokens": 16}
    prior = str(tmp_path / "gpt.pt")
    save_checkpoint(prior, {"config": {"arch": arch}, "kind": "llamagen-gpt",
                            "model": GPT.from_config(arch).state_dict()})
    rqvae, _ = load_tokenizer(tokenizers["rq-vae"])
    with pytest.raises(CheckpointError, match=f"{re.escape(prior)}: the GPT models codes of a 64-entry codebook.*32 "
                                              "entries"):
        load_prior(prior, rqvae)


def test_residual_codes_whose_depth_is_no_square_are_refused_by_the_gpt(tmp_path, capsys):
    depth_two = save_tokenizer(str(tmp_path / "depth2.pt"), "rq-vae", code_shape=[4, 4, 2])
    line = refused_in_process(capsys, main_stage2.main, [*GPT_PRIOR, "-r", str(tmp_path), "-v", depth_two, *COMMON])
    assert GPT_PRIOR[1] in line and "shape [4, 4, 2]" in line and "depth is a square" in line


def test_code_shards_that_disagree_are_named(tokenizers, tmp_path):
    vq, _ = load_tokenizer(tokenizers["vq16"])
    labels, indices = np.arange(4), np.arange(4)
    mixed = str(tmp_path / "mixed")
    write_shard(mixed, 0, np.zeros((4, 1, 4, 4), np.int64), labels, indices)
    write_shard(mixed, 1, np.zeros((4, 1, 5, 5), np.int64), labels, indices + 4)
    write_meta(mixed, {"num_shards": 2, "kind": "discrete"})
    with pytest.raises(DataError, match=r"mixed/codes_00001.npz: codes of shape \[1, 5, 5\] per image, but "
                                        r".*codes_00000.npz has \[1, 4, 4\]"):
        open_codes(mixed, 0, vq, 16)

    unlabelled = str(tmp_path / "unlabelled")
    write_shard(unlabelled, 0, np.zeros((4, 1, 4, 4), np.int64), labels[:3], indices)
    write_meta(unlabelled, {"num_shards": 1, "kind": "discrete"})
    with pytest.raises(DataError, match=r"unlabelled/codes_00000.npz: 3 labels for 4 images"):
        open_codes(unlabelled, 0, vq, 16)
