"""A fault-injection hook for the tests of elastic restarts; it does nothing unless its variable is set.

`ARGEN_TEST_FAIL_AT_STEP=STEP:RANK:MARKER` makes process RANK exit (status 1, no clean-up, as a crash) right
after optimizer step STEP, once: it creates the file MARKER first and does nothing while MARKER exists, so the
run that torchrun restarts goes on past STEP.
"""
from __future__ import annotations

import os

FAULT_VARIABLE = "ARGEN_TEST_FAIL_AT_STEP"


def crash_once_at(step: int, rank: int) -> None:
    """Exit here if the hook asks this rank to fail at this step and it has not failed yet."""
    spec = os.environ.get(FAULT_VARIABLE)
    if not spec:
        return
    at_step, at_rank, marker = spec.split(":", 2)
    if (int(at_step), int(at_rank)) == (step, rank) and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
