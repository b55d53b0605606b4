"""Small helpers shared by the test modules."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")


def run_cli(*args: str, timeout: int = 600, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """Run a repository command (`python <script> ...` or `-m torch.distributed.run ...`) from the root."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user's mistake: non-zero exit, one line on stderr naming what went wrong, no traceback."""
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def run_in_process(main, argv: list[str], capsys) -> subprocess.CompletedProcess:
    """Call an entry point's main in this process as its command line would run, reported as run_cli reports a
    process (a user's mistake exits with status 2)."""
    try:
        main(argv)
        code = 0
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out.out, out.err)


def refused_in_process(capsys, main, argv: list[str]) -> str:
    """The one stderr line of `main(argv)` run in this process, which must end with a user error (exit status 2)."""
    result = run_in_process(main, argv, capsys)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def write_learnable_codes(folder) -> str:
    """LlamaGen code files (two views each) of 32 images whose codes their class makes learnable: 12x12 codes of
    the 128-entry tiny VQ (tests/data/npp/vq_tiny.pt)."""
    from common.llamagen_codes import output_folders, write_image_codes

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 32)
    codes = labels[:, None, None, None] * 12 + rng.integers(0, 4, (32, 2, 12, 12))
    write_image_codes(output_folders(str(folder), "imagenet24"), np.arange(32), codes, labels)
    return str(folder)


def write_shapes_images(folder, count: int, resolution: int) -> str:
    """The first `count` images of the built-in shapes training set as PNGs in `folder`."""
    from common.data import ShapesDataset

    os.makedirs(folder)
    shapes = ShapesDataset("train", resolution=resolution, num_samples=count)
    for i in range(count):
        Image.fromarray(shapes.draw(i)).save(os.path.join(folder, f"{i:03d}.png"))
    return str(folder)


def train_records(run_dir) -> list[dict]:
    """The training records of a run's metrics.jsonl, in order."""
    from common.runlog import read_metrics

    return [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["split"] == "train"]


def assert_resume_is_exact(main, args: list, tmp_path, run_name: str, stop_step: int, total_steps: int) -> None:
    """A run stopped at `stop_step` and resumed logs exactly what an uninterrupted run logs (every step logged)."""
    full, part = tmp_path / "full", tmp_path / "part"
    main([*args, "-r", str(full)])
    main([*args, "-r", str(part), f"experiment.max_steps={stop_step}"])
    main([*args, "-r", str(part), "--resume"])
    expected, resumed = train_records(full / run_name), train_records(part / run_name)
    assert [r["step"] for r in resumed] == list(range(1, total_steps + 1))
    assert expected == resumed


def evaluate_then_train(main, args: list, tmp_path, run_name: str) -> dict:
    """The validation metrics of the untrained model (`--eval`, under tmp_path/init); then the run trained (under
    tmp_path)."""
    main([*args, "-r", str(tmp_path / "init"), "--eval"])
    with open(tmp_path / "init" / run_name / "eval.json") as f:
        initial = json.load(f)["val"]
    main([*args, "-r", str(tmp_path)])
    return initial
