"""Checks of the paths a user names, made before any work: an input file that is missing or a folder,
an output location that cannot be created (a file in its place or above it, no permission).

The output checks create nothing, so a refused command leaves no folder behind.
"""
from __future__ import annotations

import os

from common.errors import ConfigError, UserError

CACHE_ENV = "ARGEN_CACHE"


def default_cache_dir() -> str:
    """Where this codebase keeps what it makes or fetches once (the shapes classifier, released checkpoints):
    $ARGEN_CACHE, else ~/.cache/argen."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "argen")


def require_file(path: str, what: str, error: type[UserError]) -> None:
    """Refuse a `path` that is missing or a folder, naming it as a `what` file ("checkpoint", "config")."""
    if os.path.isdir(path):
        raise error(f"{path}: a folder, not a {what} file; give the {what} file itself")
    if not os.path.isfile(path):
        raise error(f"{path}: {what} file not found")


def nearest_existing(path: str) -> str:
    """`path` itself if it exists, else its closest existing ancestor (absolute)."""
    current = os.path.abspath(path)
    while not os.path.exists(current) and os.path.dirname(current) != current:
        current = os.path.dirname(current)
    return current


def check_output_dir(path: str, flag: str) -> None:
    """Refuse an output folder (given by `flag`) that cannot be created or written into."""
    check_creatable(path, path, flag)


def check_output_file(path: str, flag: str) -> None:
    """Refuse an output file (given by `flag`) that is a folder, or whose folder cannot be created."""
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: a folder; give a file name")
    check_creatable(os.path.dirname(os.path.abspath(path)), path, flag)


def check_creatable(folder: str, given: str, flag: str) -> None:
    """Refuse `folder` (needed for the output `given` by `flag`) if a file stands in its way or it is read-only."""
    existing = nearest_existing(folder)
    if not os.path.isdir(existing):
        where = "is a file" if existing == os.path.abspath(given) else f"lies under {existing}, which is a file"
        raise ConfigError(f"{flag} {given}: {where}, not a folder; choose another output location")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {given}: {existing} is not writable; choose another output location")
