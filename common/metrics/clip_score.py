"""CLIP score of text-to-image samples, as the official RQ-Transformer evaluation computes it.

Each image and its caption are embedded by CLIP ViT-B/32 (OpenAI's weights, through open_clip); the
score of a pair is the plain cosine similarity of the two embeddings (no x100, no clipping at 0),
and the CLIP score of a set is the mean over its pairs. Images go through CLIP's own preprocessing
(bicubic resize of the short side to 224, centre crop, OpenAI mean/std); captions through CLIP's BPE
tokenizer, 77 tokens, longer captions truncated. Everything runs in fp32.

The weights come from a local file only (`--clip-weights`, or torch's hub cache), read as data: a
state dict in open_clip's layout of the OpenAI model (the safetensors or .bin file that open_clip
itself downloads for `ViT-B-32` / `openai`), its tensors checked against the network before loading.
open_clip is imported only when a CLIP model is built, so scripts that never score CLIP do not pay for it.

Pairing (`pair_captions`): caption i of a captions file (see common/captions.py) goes with
- the file the row names, relative to the samples folder, when rows name files (the captions file
  text-to-image sampling writes beside its samples: `00012.png` holds caption 12's image);
- otherwise the image whose file name, without extension, is the integer i (`12.png`, `00012.png`);
- row i of an `.npz` batch.
"""
from __future__ import annotations

import logging
import os
import zipfile
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Subset

from common import dist
from common.captions import read_caption_rows, sample_file_name
from common.checkpoint import load_file, weight_mismatches
from common.errors import CheckpointError, ConfigError, DataError, WeightsError
from common.metrics.images import FolderImages
from common.releases import CLIP_FILE, CLIP_URL
from common.weights import find_weights

CLIP_MODEL = "ViT-B-32-quickgelu"  # OpenAI's ViT-B/32 uses QuickGELU activations
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")  # in OpenAI's state dict, not weights


def find_clip_weights(explicit_path: str | None = None, flag: str = "--clip-weights") -> str:
    """Path of the local CLIP ViT-B/32 weights (explicit, or torch's hub cache); else a WeightsError saying where
    to get them."""
    return find_weights(CLIP_FILE, explicit_path, CLIP_URL, flag)


def is_torchscript(path: str) -> bool:
    """OpenAI's own ViT-B-32.pt is a TorchScript archive: code, which is never run here."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 2)[1:2] == ["code"] for name in archive.namelist())


def read_clip_state(path: str) -> Mapping[str, Any]:
    """The tensors of a CLIP weights file (safetensors, or a torch state dict read as data only)."""
    expected = f"expected the OpenAI ViT-B/32 weights in open_clip's layout, {CLIP_URL}"
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors
        try:
            return load_safetensors(path)
        except (SafetensorError, OSError) as error:
            raise WeightsError(f"{path}: not a readable safetensors file ({error}); {expected}") from None
    if is_torchscript(path):
        raise WeightsError(f"{path}: a TorchScript archive (OpenAI's ViT-B-32.pt holds code, which is not loaded "
                           f"here); use the same weights as a plain state dict, {CLIP_URL}")
    try:
        state = load_file(path)
    except CheckpointError as error:
        raise WeightsError(f"{error}; {expected}") from None
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path}: holds a {type(state).__name__}, not a state dict; {expected}")
    return state


class ClipScorer:
    """An open_clip CLIP model in eval mode with its image preprocessing and tokenizer."""

    def __init__(self, weights_path: str, model_name: str = CLIP_MODEL, device: str | torch.device = "cpu"):
        import open_clip  # slow to import: only when CLIP is used

        state = {k: v for k, v in read_clip_state(weights_path).items() if k not in OPENAI_EXTRA_KEYS}
        silenced = logging.root.manager.disable
        logging.disable(logging.WARNING)  # open_clip warns that the model is random: its weights are loaded below
        try:
            model, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
        except RuntimeError as error:
            raise ConfigError(f"--clip-model {model_name}: {error}") from None
        finally:
            logging.disable(silenced)
        problems = weight_mismatches(model.state_dict(), state)
        if problems:
            raise WeightsError(f"{weights_path}: not the weights of open_clip's {model_name} ({problems[0]}); "
                               f"the OpenAI ViT-B/32 weights are at {CLIP_URL}")
        model.load_state_dict(state)
        self.model = model.float().eval().to(device)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = torch.device(device)
        self.description = f"open_clip {open_clip.__version__} {model_name} ({os.path.basename(weights_path)})"

    @torch.no_grad()
    def scores(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Cosine similarities (B,) of uint8 images (B, 3, H, W) and their captions."""
        pixels = torch.stack([self.preprocess(Image.fromarray(image.permute(1, 2, 0).numpy()))
                              for image in images.cpu()])
        image_features = self.model.encode_image(pixels.to(self.device))  # (B, D)
        text_features = self.model.encode_text(self.tokenizer(captions).to(self.device))  # (B, D)
        return F.cosine_similarity(image_features.float(), text_features.float()).cpu()


class ClipAccumulator:
    """`extract_features`' accumulator for the CLIP score: this rank's shard of images arrives in order, and
    `captions` are the captions of that shard."""

    def __init__(self, scorer: ClipScorer, captions: list[str]):
        self.scorer, self.captions = scorer, captions
        self.chunks: list[torch.Tensor] = []
        self.seen = 0

    def add(self, images: torch.Tensor) -> None:
        batch = self.captions[self.seen:self.seen + len(images)]
        self.chunks.append(self.scorer.scores(images, batch))
        self.seen += len(images)

    def gather(self) -> torch.Tensor:
        """The scores (N,) of all ranks in pair order; collective under torchrun."""
        local = torch.cat(self.chunks) if self.chunks else torch.zeros(0)
        return dist.all_gather_cat(local.to(self.scorer.device)).cpu()


def images_by_index(folder: FolderImages) -> dict[int, str]:
    """Images whose file name (without extension) is an integer, by that integer; two files of one index are
    refused."""
    found: dict[int, str] = {}
    for path in folder.paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem.isdigit():
            if int(stem) in found:
                raise DataError(f"{path} and {found[int(stem)]} are both image {int(stem)}; keep one of them")
            found[int(stem)] = path
    return found


def pair_captions(fake: str, images: Dataset, captions_path: str) -> tuple[Dataset, list[str], int]:
    """(the images in caption order, the captions, how many images of `fake` have no caption) by the module's
    pairing rules; an image missing for a caption is refused with one line."""
    rows = read_caption_rows(captions_path)
    captions = [caption for _, caption in rows]
    if not isinstance(images, FolderImages):
        if len(images) != len(rows):
            raise DataError(f"{fake} holds {len(images)} images and {captions_path} {len(rows)} captions; "
                            "image i of an .npz is scored with caption i, so the counts must agree")
        return images, captions, 0
    if rows[0][0] is not None:
        wanted = [os.path.normpath(os.path.join(fake, file)) for file, _ in rows]
        position = {os.path.normpath(path): i for i, path in enumerate(images.paths)}
    else:
        by_index = images_by_index(images)
        wanted = [by_index.get(i, os.path.join(fake, sample_file_name(i))) for i in range(len(rows))]
        position = {path: i for i, path in enumerate(images.paths)}
    missing = [(i, path) for i, path in enumerate(wanted) if path not in position]
    if missing:
        index, path = missing[0]
        raise DataError(f"{captions_path}: caption {index} has no image {path} ({len(missing)} of {len(rows)} "
                        "captions have none); score the folder the captions file was written with")
    indices = [position[path] for path in wanted]
    return Subset(images, indices), captions, len(images) - len(set(indices))
