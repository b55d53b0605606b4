"""User-facing errors: one clear line and a non-zero exit, never a traceback."""
from __future__ import annotations

import functools
import gc
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


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (or its type's name), for a one-line error about it."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def one_line(error: UserError) -> str:
    """The message of a user's error. Raised inside a DataLoader worker, it arrives wrapped in the worker's
    traceback ("Caught DataError in DataLoader worker process 0. Original Traceback ..."), whose last line
    holds the original message."""
    message = str(error)
    if "\nOriginal Traceback" in message:
        message = message.strip().splitlines()[-1].split(": ", 1)[-1]
    return message


def cli_entry(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap an entry point so a UserError ends the process with one line on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            line = f"{type(error).__name__}: {one_line(error)}"
        # Out of the handler the traceback is released; collecting it ends the DataLoader workers its frames held,
        # so no warning of theirs follows the message.
        gc.collect()
        print(line, file=sys.stderr, flush=True)
        sys.exit(2)

    return wrapped
