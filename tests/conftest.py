"""Fixtures shared across test modules."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from common.dist import intra_op_threads
from tests.helpers import run_cli, write_learnable_codes, write_shapes_images


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread in this process, as in every process the tests start (run_cli sets OMP_NUM_THREADS=1).
    The tests' models are tiny: threads gain nothing on them, and on a busy machine their hand-offs cost many times
    the maths. With equal thread counts, this process also computes bit for bit what a torchrun worker computes,
    which the comparisons of one process with two rely on."""
    with intra_op_threads(1):
        yield


@pytest.fixture(scope="session")
def two_process_runs(tmp_path_factory) -> Path:
    """The folder of the runs of tests/two_process_runs.py, made in one torchrun launch for the whole session."""
    out = tmp_path_factory.mktemp("two_processes")
    write_learnable_codes(out / "codes")
    write_shapes_images(out / "images", 40, resolution=16)
    result = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/two_process_runs.py",
                     str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out
