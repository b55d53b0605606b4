"""The catalogue of released files: each name (`rqvae-ffhq`, `llamagen-vq16`, `kl16`, `inception`, ...) lists the
files its publisher put online, the SHA-256 where the publisher gives one, and where they are laid out so that our
loaders read them as they are.

Plain data, read by `scripts/download.py` (which fetches) and `common/weights.py` (which resolves a name given
where a checkpoint path is taken). Model checkpoints land in `<checkpoints dir>/<folder>/` (default
`$ARGEN_CACHE/checkpoints`, else `~/.cache/argen/checkpoints`); the Inception and VGG16 weights in torch's hub
cache, where the metrics and LPIPS look for them.

Checksums: torchvision's `vgg16-397923af.pth` carries the leading hex digits of its SHA-256 in its name
(torch.hub's convention, which torchvision checks on load); torch-fidelity names
`weights-inception-2015-12-05-6726825d.pth` the same way (it does not check the digits itself; they are checked
here as a prefix). Hugging Face publishes the SHA-256 of every large file (its page, and the `X-Linked-Etag` header
of the download), which the downloader checks. The RQ-VAE archives (arena.kakaocdn.net), the MAR files (Dropbox)
and the Open-MAGVIT2 YAMLs (GitHub) come with none.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

from common.paths import default_cache_dir

RQ_HOST = "https://arena.kakaocdn.net/brainrepo/models/RQVAE"
LLAMAGEN_HOST = "https://huggingface.co/FoundationVision/LlamaGen/resolve/main"
NPP_HOST = "https://huggingface.co/pytttttt/LlamaGen-NPP/resolve/main"
OPENMAGVIT2_HOST = "https://huggingface.co/TencentARC/Open-MAGVIT2-Tokenizer-{size}-resolution/resolve/main"
# the commit whose configs/Open-MAGVIT2/gpu/ holds the YAMLs the released tokenizers were trained with
OPENMAGVIT2_CONFIGS = ("https://raw.githubusercontent.com/TencentARC/Open-MAGVIT2/"
                       "21e1f93e14b512c151afbbd19b6d0fb39118243d/configs/Open-MAGVIT2/gpu")
CLIP_FILE = "open_clip_vit_b32_openai.safetensors"  # the name common/metrics/clip_score.py looks up in the hub cache
CLIP_URL = "https://huggingface.co/timm/vit_base_patch32_clip_224.openai/resolve/main/open_clip_model.safetensors"
DROPBOX = "https://www.dropbox.com/scl/fi"  # dl=1: the file itself, not Dropbox's preview page


@dataclass(frozen=True)
class PublishedFile:
    url: str
    name: str  # the file name it is saved under in its release's folder
    sha256: str | None = None  # the whole digest or its leading digits (a hub file name's); None: not published
    archive: bool = False  # a .tar.gz unpacked into the folder (a single top-level folder in it is dropped)


@dataclass(frozen=True)
class Release:
    name: str
    description: str
    publisher: str
    files: tuple[PublishedFile, ...]
    target: str  # the file the name stands for, relative to its folder
    folder: str  # under the checkpoints dir; releases of one archive share it
    config: str | None = None  # the config a loader needs beside the file (relative to the folder)
    in_torch_hub: bool = False  # laid out flat in torch's hub cache (the folder is unused)


def checkpoints_dir() -> str:
    """Where released model checkpoints are laid out by default."""
    return os.path.join(default_cache_dir(), "checkpoints")


# ----------------------------------------------------------------------------------------------
# RQ-VAE + RQ-Transformer (kakaobrain/rq-vae-transformer): one archive per model pair, each file with
# the config.yaml the loaders read beside it: (tag, path on the host, RQ-Transformer size, note)
# ----------------------------------------------------------------------------------------------

RQ_ARCHIVES = (
    ("ffhq", "d47570aeff6ba300735606a806f54663/ffhq.tar.gz", "355M", "FFHQ 256, unconditional"),
    ("church", "deeb3e0ac6e09923754e3e594ede7b01/church.tar.gz", "370M", "LSUN-Church 256, unconditional"),
    ("cat", "92b4e6a9ace09c9ab8ff9d3b3e688367/cat.tar.gz", "612M", "LSUN-Cat 256, unconditional"),
    ("bedroom", "06b72c164cd2fe64fc8ebd6b42b0040f/bedroom.tar.gz", "612M", "LSUN-Bedroom 256, unconditional"),
    ("in256-480M", "7518a004fe39120fcffbba76005dc6c3/imagenet_480M.tar.gz", "480M", "ImageNet 256, class-conditional"),
    ("in256-821M", "dcd39292319104da5577dec3956bfdcc/imagenet_821M.tar.gz", "821M", "ImageNet 256, class-conditional"),
    ("in256-1400M", "f5cf4e5f3f0b5088d52cbb5e85c1077f/imagenet_1.4B.tar.gz", "1.4B", "ImageNet 256, class-conditional"),
    ("in256-1400M-rqvae50e", "6714b47bb9382076923590eff08b1ee5/imagenet_1.4B_rqvae_50e.tar.gz", "1.4B",
     "ImageNet 256, class-conditional, RQ-VAE trained 50 epochs"),
    ("in256-3800M-rqvae50e", "e1ee2fef2928f7fd31f53a8348f08b88/imagenet_3.8B_rqvae_50e.tar.gz", "3.8B",
     "ImageNet 256, class-conditional, RQ-VAE trained 50 epochs"),
    ("cc3m", "dcd95e8f08408e113aab6451fae895f5/cc3m.tar.gz", "654M", "CC-3M, text-conditioned"),
    ("cc3m-cc12m-yfcc", "3a8429cd7ec0e0f2b66fca94804c79d5/cc3m_cc12m_yfcc.tar.gz", "3.9B",
     "CC-3M + CC-12M + YFCC subset, text-conditioned"),
)


RQ_VOCABULARIES = ("https://raw.githubusercontent.com/kakaobrain/rq-vae-transformer/"
                   "c3de514d7c832f63eff333833b456c53a342e8c0/rqvae/txtimg_datasets/tokenizers/pretrained")


def rq_vocabulary(size: str, digests: tuple[str | None, str | None]) -> Release:
    """A released BPE text vocabulary of the text-to-image RQ-Transformers (vocabulary + merges), read from torch's
    hub cache by common/text_tokenizer.py."""
    files = tuple(PublishedFile(f"{RQ_VOCABULARIES}/bpe-{size}-{part}", f"bpe-{size}-{part}", digest)
                  for part, digest in zip(("vocab.json", "merges.txt"), digests))
    return Release(f"bpe-{size}", f"BPE text vocabulary ({size}) of the text-to-image RQ-Transformers",
                   "kakaobrain/rq-vae-transformer (github.com)", files, files[0].name, "", in_torch_hub=True)


def rq_pair(tag: str, path: str, prior_size: str, note: str) -> tuple[Release, Release]:
    """The RQ-VAE and the RQ-Transformer of one archive: the same download, unpacked once into rq-<tag>/."""
    archive = (PublishedFile(f"{RQ_HOST}/{path}", os.path.basename(path), archive=True),)
    publisher = "kakaobrain/rq-vae-transformer (arena.kakaocdn.net)"
    return (Release(f"rqvae-{tag}", f"RQ-VAE 8x8x4 of the {tag} archive ({note})", publisher, archive,
                    "stage1/model.pt", f"rq-{tag}"),
            Release(f"rqtransformer-{tag}", f"RQ-Transformer {prior_size} ({note})", publisher, archive,
                    "stage2/model.pt", f"rq-{tag}"))


# ----------------------------------------------------------------------------------------------
# LlamaGen (FoundationVision/LlamaGen) and Next Patch Prediction (PKU-YuanGroup/Next-Patch-Prediction)
# ----------------------------------------------------------------------------------------------

LLAMAGEN_GPTS = (("b", "B", 256), ("b", "B", 384), ("l", "L", 256), ("l", "L", 384), ("xl", "XL", 384),
                 ("xxl", "XXL", 384), ("3b", "3B", 384))
NPP_GPTS = (("b", "B"), ("l", "L"), ("xl", "XL"), ("xxl", "XXL"))


def single_file(name: str, description: str, publisher: str, url: str, sha256: str | None = None) -> Release:
    """A release of one file, saved under its published name in the folder <name>/."""
    file_name = os.path.basename(url).split("?")[0]
    return Release(name, description, publisher, (PublishedFile(url, file_name, sha256),), file_name, name)


def openmagvit2(size: int) -> Release:
    """An Open-MAGVIT2 tokenizer with the official YAML it was trained with beside it (its loader needs both)."""
    ckpt, yaml = f"imagenet_{size}_L.ckpt", f"imagenet_lfqgan_{size}_L.yaml"
    files = (PublishedFile(f"{OPENMAGVIT2_HOST.format(size=size)}/{ckpt}", ckpt),
             PublishedFile(f"{OPENMAGVIT2_CONFIGS}/{yaml}", yaml))
    return Release(f"openmagvit2-{size}", f"Open-MAGVIT2 tokenizer, ImageNet {size}, 16x16 codes of 18 bits",
                   "TencentARC/Open-MAGVIT2 (huggingface.co, the YAML from github.com)", files, ckpt,
                   f"openmagvit2-{size}", config=yaml)


def mar_model(size: str, path: str) -> Release:
    return single_file(f"mar-{size}", f"MAR-{size[0].upper()} with its DiffLoss (checkpoint-last.pth; main_mar.py "
                       f"--resume mar-{size} takes its folder)", "LTH14/mar (dropbox.com)",
                       f"{DROPBOX}/{path}&dl=1")


def torch_hub_file(name: str, description: str, publisher: str, url: str) -> Release:
    """A file read from torch's hub cache; the hex digits at the end of its name begin its SHA-256."""
    file_name = os.path.basename(url)
    prefix = os.path.splitext(file_name)[0].rsplit("-", 1)[1]
    return Release(name, description, publisher, (PublishedFile(url, file_name, prefix),), file_name, "",
                   in_torch_hub=True)


VGG16 = torch_hub_file("vgg16", "torchvision's ImageNet VGG16 (the LPIPS trunk)",
                       "pytorch/vision (download.pytorch.org)",
                       "https://download.pytorch.org/models/vgg16-397923af.pth")

RELEASES: dict[str, Release] = {release.name: release for release in (
    *(release for archive in RQ_ARCHIVES for release in rq_pair(*archive)),
    rq_vocabulary("16k", ("d2aab26096e9bd5997d1bb00e55414318163bc5d85652a6cdc63cffd94d9e96e",
                          "3e21329c78e51892bcf06fe184147db7b15b218db073b530e42cf65301e41381")),
    rq_vocabulary("30k", (None, None)),
    single_file("llamagen-vq16", "LlamaGen VQ-16 tokenizer (16x16 codes at 256 px, 16384 codes)",
                "FoundationVision/LlamaGen (huggingface.co)", f"{LLAMAGEN_HOST}/vq_ds16_c2i.pt"),
    *(single_file(f"llamagen-gpt-{short}-{size}", f"LlamaGen GPT-{model} class-conditional, {size} px",
                  "FoundationVision/LlamaGen (huggingface.co)", f"{LLAMAGEN_HOST}/c2i_{model}_{size}.pt")
      for short, model, size in LLAMAGEN_GPTS),
    *(single_file(f"npp-gpt-{short}", f"LlamaGen GPT-{model} trained by next-patch prediction, 256 px",
                  "PKU-YuanGroup/Next-Patch-Prediction (huggingface.co)", f"{NPP_HOST}/c2i_{model}_256.pt")
      for short, model in NPP_GPTS),
    openmagvit2(256),
    openmagvit2(128),
    single_file("kl16", "MAR's KL-16 VAE (kl16.ckpt)", "LTH14/mar (dropbox.com)",
                f"{DROPBOX}/hhmuvaiacrarfg28qxhwz/kl16.ckpt?rlkey=l44xipsezc8atcffdp4q7mwmh&dl=1"),
    mar_model("base", "f6dpuyjb7fudzxcyhvrhk/checkpoint-last.pth?rlkey=a6i4bo71vhfo4anp33n9ukujb"),
    mar_model("large", "pxacc5b2mrt3ifw4cah6k/checkpoint-last.pth?rlkey=m48ovo6g7ivcbosrbdaz0ehqt"),
    mar_model("huge", "1qmfx6fpy3k7j9vcjjs3s/checkpoint-last.pth?rlkey=4lae281yzxb406atp32vzc83o"),
    torch_hub_file("inception", "torch-fidelity's Inception-v3 (FID, IS, precision/recall)",
                   "toshas/torch-fidelity (github.com)", "https://github.com/toshas/torch-fidelity/releases/download/"
                   "v0.2.0/weights-inception-2015-12-05-6726825d.pth"),
    VGG16,
    Release("clip", "OpenAI's CLIP ViT-B/32 in open_clip's layout (CLIP score of text-to-image samples)",
            "openai, via timm (huggingface.co)", (PublishedFile(CLIP_URL, CLIP_FILE),), CLIP_FILE, "",
            in_torch_hub=True),
    replace(VGG16, name="lpips", description="what LPIPS needs: the VGG16 trunk (its linear heads ship inside the "
                                             "lpips package)"),
)}


def releases_of_file(file_name: str) -> list[str]:
    """The names of the releases that publish a file called `file_name`."""
    return [release.name for release in RELEASES.values() if any(f.name == file_name for f in release.files)]
