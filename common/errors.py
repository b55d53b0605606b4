"""User-facing errors: one clear line and a non-zero exit, never a traceback."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A mistake a user can fix (bad config, missing file, wrong checkpoint). Printed as one line."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class CheckpointError(UserError):
    pass


class WeightsError(UserError):
    """Pretrained weights (Inception, VGG, official checkpoints) missing or malformed."""


def cli_entry(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap an entry point so a UserError ends the process with one line on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            print(f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapped
