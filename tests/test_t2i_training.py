"""Text-to-image end to end: training on captioned shapes through main_stage2.py, sampling from prompts with
scripts/sample.py and main_sampling_txt2img.py, and the bad inputs of that path."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import main_sampling_txt2img
import main_stage2
from common.captions import read_caption_rows
from common.data import CaptionedShapesDataset
from scripts import sample
from tests.helpers import DATA, refused_in_process, train_records
from tests.test_t2i_rqtransformer import write_release

CONFIG = "configs/shapes/stage2/rqtransformer-t2i.yaml"
RUN = "rqtransformer-t2i"
STAGE1 = os.path.join(DATA, "rqvae", "stage1", "model.pt")  # 16x16 images -> 8x8x3 codes, 32 codes
CLASS_PRIOR = os.path.join(DATA, "rqvae", "stage2", "model.pt")
TINY = ["-m", CONFIG, "-v", STAGE1, "dataset.resolution=16", "dataset.num_samples=48", "arch.block_size=[8,8,3]",
        "arch.embed_dim=32", "arch.body.n_layer=2", "arch.head.n_layer=1", "experiment.batch_size=8",
        "experiment.log_every=1", "experiment.test_freq=2", "experiment.eval_batches=1", "experiment.preview_images=1",
        "experiment.sample.top_k=4", "optimizer.init_lr=3e-3", "--device", "cpu"]
PROMPTS = ["a red star on a blue background, top left", "a white ring on a green background, center"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-epoch run (12 steps) of the tiny text model; returns its folder."""
    root = tmp_path_factory.mktemp("t2i_run")
    main_stage2.main([*TINY, "-r", str(root)])
    return root / RUN


def test_text_model_trains_on_captioned_shapes_and_its_loss_falls(run):
    records = train_records(run)
    assert [r["step"] for r in records] == list(range(1, 13))
    first, last = records[0], records[-1]
    assert last["loss_txt"] < first["loss_txt"] - 1.0 and last["loss"] < first["loss"]
    ckpt = torch.load(run / "last.pt", weights_only=True)
    vocabulary = json.loads(ckpt["text_tokenizer"]["tokenizer"])["model"]["vocab"]
    assert vocabulary["[PAD]"] == 0 and vocabulary["[UNK]"] == 1 and "star" in vocabulary
    assert ckpt["config"]["arch"]["vocab_size_cond"] == len(vocabulary)
    assert (run / "images" / "epoch0002.png").is_file()


def test_resume_continues_exactly(run, tmp_path):
    main_stage2.main([*TINY, "-r", str(tmp_path), "experiment.max_steps=4"])
    main_stage2.main([*TINY, "-r", str(tmp_path), "--resume"])
    assert train_records(tmp_path / RUN) == train_records(run)


def test_prompts_sample_the_same_images_in_both_scripts(run, tmp_path, capsys):
    prior = str(run / "last.pt")
    long_prompt = "a red star on a blue background, top left, a white ring on a green background, center"
    sample.main(["-v", STAGE1, "-a", prior, "--prompt", PROMPTS[0], "--prompt", long_prompt, "-n", "2", "-bs", "2",
                 "--seed", "3", "--device", "cpu", "--output", str(tmp_path / "few")])
    assert "note: --prompt 2 has 20 text tokens; the prior reads the first 12" in capsys.readouterr().out
    assert np.load(tmp_path / "few" / "codes.npy").shape == (4, 8, 8, 3)
    rows = read_caption_rows(str(tmp_path / "few" / "captions.jsonl"))
    assert rows == [("00000.png", PROMPTS[0]), ("00001.png", PROMPTS[0]), ("00002.png", long_prompt),
                    ("00003.png", long_prompt)]
    assert Image.open(tmp_path / "few" / "grid.png").size[0] == 2 * (128 + 2) + 2  # two per row, enlarged to 128

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[0]}\n")
    # 3 captions in batches of 2: the last batch is padded with an empty caption, whose image is dropped
    out = main_sampling_txt2img.main(["-v", STAGE1, "-a", prior, "--prompts", str(prompts), "--prompt", long_prompt,
                                      "-bs", "2", "--seed", "3", "--device", "cpu",
                                      "--save-dir", str(tmp_path / "results")])
    samples = sorted(glob.glob(os.path.join(out, "samples", "*.png")))
    assert [os.path.basename(p) for p in samples] == ["00000.png", "00001.png", "00002.png"]
    for index, path in enumerate(samples):  # the same seed and captions, rows drawn alike: the same images
        assert np.array_equal(np.array(Image.open(path)), np.array(Image.open(tmp_path / "few" / f"{index:05d}.png")))
    assert read_caption_rows(os.path.join(out, "samples", "captions.jsonl")) == rows[:3]
    settings = json.load(open(os.path.join(out, "sampling.json")))
    assert settings["num_images"] == 3 and settings["top_k"] == [4, 4, 4]
    assert Image.open(os.path.join(out, "grid.png")).size[0] == 3 * (128 + 2) + 2


def test_a_release_samples_from_prompts_with_its_released_vocabulary(tmp_path, capsys):
    release = write_release(tmp_path / "release")
    vocabulary = tmp_path / "vocabulary"
    write_vocabulary(vocabulary, 16384)
    out = tmp_path / "out"
    sample.main(["-v", f"{release}/stage1/model.pt", "-a", f"{release}/stage2/model.pt", "--prompt", "a cat",
                 "--text-tokenizer", str(vocabulary), "--top-k", "1", "--device", "cpu", "--output", str(out)])
    assert np.load(out / "codes.npy").shape == (1, 4, 4, 3) and (out / "00000.png").is_file()
    capsys.readouterr()

    small = tmp_path / "small"
    write_vocabulary(small, 100)
    line = refused_in_process(capsys, sample.main, ["-v", f"{release}/stage1/model.pt", "-a",
                                                    f"{release}/stage2/model.pt", "--prompt", "a cat",
                                                    "--text-tokenizer", str(small), "--output", str(tmp_path / "no")])
    assert "the text tokenizer has 100 tokens" in line and "the prior reads 16384 tokens" in line
    line = refused_in_process(capsys, main_sampling_txt2img.main,
                              ["-v", f"{release}/stage1/model.pt", "-a", f"{release}/stage2/model.pt", "--prompt",
                               "a cat", "--text-tokenizer", str(tmp_path), "--save-dir", str(tmp_path / "no")])
    assert "bpe-16k-vocab.json" in line and "rqvae/txtimg_datasets/tokenizers/pretrained/" in line
    assert not (tmp_path / "no").exists()


def write_vocabulary(folder, size: int) -> None:
    """A CharBPE vocabulary of `size` tokens in the released files' names and layout (no merges)."""
    folder.mkdir()
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["[PAD]", "[UNK]", *letters, *(f"{c}</w>" for c in letters)]
    tokens += [f"filler{i}</w>" for i in range(size - len(tokens))]
    (folder / "bpe-16k-vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "bpe-16k-merges.txt").write_text("#version: 0.2\n")


@pytest.mark.parametrize("script, argv, fragments", [
    ("txt2img", ["--prompt", PROMPTS[0], "--prompt", " "], ["--prompt 2: the prompt ' ' is empty"]),
    ("txt2img", ["--prompt", PROMPTS[0], "--dataset", "cc3m"], ["--prompt / --prompts or as --dataset"]),
    ("sample", [], ["a text-conditioned prior; give --prompt TEXT"]),
])
def test_bad_prompts_are_one_line_and_write_nothing(run, tmp_path, capsys, script, argv, fragments):
    out = tmp_path / "out"
    common = ["-v", STAGE1, "-a", str(run / "last.pt"), "--device", "cpu"]
    if script == "txt2img":
        line = refused_in_process(capsys, main_sampling_txt2img.main, [*common, *argv, "--save-dir", str(out)])
    else:
        line = refused_in_process(capsys, sample.main, [*common, *argv, "--output", str(out)])
    assert all(fragment in line for fragment in fragments), line
    assert not out.exists()


def test_class_priors_refuse_prompts_in_one_line(tmp_path, capsys):
    common = ["-v", STAGE1, "-a", CLASS_PRIOR, "--device", "cpu"]
    line = refused_in_process(capsys, sample.main, [*common, "--prompt", "a cat", "--output", str(tmp_path / "a")])
    assert "--prompt: this prior is not text-conditioned" in line
    line = refused_in_process(capsys, main_sampling_txt2img.main, [*common, "--prompt", "a cat",
                                                                    "--save-dir", str(tmp_path / "b")])
    assert "not a text-conditioned prior; sample it with main_sampling_fid.py" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_training_a_text_model_on_uncaptioned_data_is_one_line(tmp_path, capsys):
    line = refused_in_process(capsys, main_stage2.main, [*TINY, "-r", str(tmp_path), "dataset.captions=false"])
    assert "trains on captioned images, and dataset.type shapes has none" in line
    assert not (tmp_path / RUN).exists()


def test_the_official_cc3m_config_trains_through_main_stage2(tmp_path):
    """The CC-3M YAML as released (dataset.dataset, image_resolution, transforms: dalle-vqvae, bpe_dropout 0.1), on
    a folder in the CC-3M layout, at a tiny width."""
    root = tmp_path / "cc3m"
    shapes = CaptionedShapesDataset("train", resolution=16, num_samples=4)
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(shapes.draw(i)).save(root / split / f"{i:04x}", format="PNG")  # no extension, as CC-3M
        (root / f"{split}_list.txt").write_text("".join(f"./{split}/{i:04x}\t{shapes.scene(i).caption}\n"
                                                        for i in range(4)))
    vocabulary = tmp_path / "vocabulary"
    write_vocabulary(vocabulary, 16384)
    main_stage2.main(["-m", "configs/cc3m/stage2/cc3m-rqtransformer-8x8x4-650M.yaml", "-r", str(tmp_path / "runs"),
                      "-v", STAGE1, "--device", "cpu", f"dataset.root={root}", "dataset.image_resolution=16",
                      "dataset.vocab_size=32", f"dataset.txt_tok_path={vocabulary}", "arch.block_size=[8,8,3]",
                      "arch.embed_dim=16", "arch.input_embed_dim=8", "arch.body.n_layer=1", "arch.head.n_layer=1",
                      "arch.body.block.n_head=2", "arch.head.block.n_head=2", "experiment.batch_size=2",
                      "experiment.total_batch_size=2", "experiment.epochs=1", "experiment.log_every=1",
                      "experiment.preview_images=1"])
    run = tmp_path / "runs" / "cc3m-rqtransformer-8x8x4-650M"
    assert [r["step"] for r in train_records(run)] == [1, 2] and "loss_txt" in train_records(run)[0]
    dataset = torch.load(run / "last.pt", weights_only=True)["config"]["dataset"]
    assert (dataset["type"], dataset["resolution"], dataset["transforms"], dataset["context_length"]) == \
        ("cc3m", 16, {"type": "dalle-vqvae"}, 32)
