"""Finding pretrained weight files offline (Inception for FID, VGG16 for LPIPS, released checkpoints by name).

Nothing is downloaded: a file is taken from an explicit path, from torch's hub cache
(`$TORCH_HOME/hub/checkpoints`, by default `~/.cache/torch/hub/checkpoints`), or, for a name of the
release catalogue (`common/releases.py`), from where `scripts/download.py` lays it out. A missing
file is a WeightsError that names it, where to put it, where it is published and which command fetches it.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from common.errors import WeightsError
from common.releases import RELEASES, Release, checkpoints_dir, releases_of_file


def hub_checkpoint_dir() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def release_dir(release: Release, root: str | None = None) -> str:
    """The folder a release's files are laid out in: under `root` if given, else where our loaders look."""
    if release.in_torch_hub:
        return root or hub_checkpoint_dir()
    return os.path.join(root or checkpoints_dir(), release.folder)


def download_command(names: list[str]) -> str:
    """How to fetch the release (or one of the releases) `names`."""
    command = f"python scripts/download.py {names[0]}"
    return command if len(names) == 1 else f"{command} (or {', '.join(names[1:])})"


def released_path(value: str) -> str | None:
    """The downloaded file of the release `value` names (an existing path of that name wins), None when `value`
    names none; a release not downloaded yet is a WeightsError naming the command that fetches it."""
    release = RELEASES.get(value)
    if release is None or os.path.exists(value):
        return None
    path = os.path.join(release_dir(release), release.target)
    if not os.path.isfile(path):
        raise WeightsError(f"{value}: a released checkpoint that is not downloaded yet (no {path}); fetch it with "
                           f"{download_command([value])}")
    return path


class ResolvedCheckpoint(NamedTuple):
    path: str
    config: str | None


def resolve_checkpoint(value: str, config: str | None = None) -> ResolvedCheckpoint:
    """(checkpoint path, config path) for a checkpoint given by path or by release name.

    A release name becomes its downloaded file, with the config released beside it unless `config` is given.
    A missing path whose file name the catalogue publishes is a WeightsError naming the download command;
    any other path comes back as it is, for the loader to read or refuse.
    """
    path = released_path(value) if value else None
    if path is not None:
        release = RELEASES[value]
        return ResolvedCheckpoint(path, config or (os.path.join(release_dir(release), release.config)
                                                   if release.config else None))
    names = releases_of_file(os.path.basename(value)) if value and not os.path.exists(value) else []
    if names:
        raise WeightsError(f"{value}: file not found; it is released as {', '.join(names)}: fetch it with "
                           f"{download_command(names)} and pass that name instead")
    return ResolvedCheckpoint(value, config)


def resolve_checkpoint_folder(value: str) -> str:
    """`value`, or the folder of the released checkpoint it names (for flags that take a folder, like
    main_mar.py's --resume)."""
    path = resolve_checkpoint(value).path
    return value if path == value else os.path.dirname(path)


def find_weights(filename: str, explicit_path: str | None, url: str, flag: str) -> str:
    """Return a readable path to `filename`: `explicit_path` (a path or a release name) if given, else the hub
    cache copy.

    `flag` is the command-line option or config key that sets `explicit_path`, named in the error.
    """
    fetch = f"; {download_command(names)} fetches it" if (names := releases_of_file(filename)) else ""
    if explicit_path:
        explicit_path = released_path(explicit_path) or explicit_path
        if os.path.isdir(explicit_path):
            raise WeightsError(f"weights file {explicit_path} (given by {flag}) is a folder; give the file {filename} "
                               "itself")
        if os.path.isfile(explicit_path):
            return explicit_path
        raise WeightsError(f"weights file {explicit_path} (given by {flag}) does not exist; "
                           f"it should be {filename}, published at {url}{fetch}")
    cached = os.path.join(hub_checkpoint_dir(), filename)
    if os.path.isfile(cached):
        return cached
    raise WeightsError(f"pretrained weights {filename} not found: download {url} and either pass "
                       f"{flag} PATH or put it at {cached}{fetch}")
