"""A run's curves: TensorBoard event files beside metrics.jsonl, and scripts/plot_run.py's PNG of one or several runs.

The run is test_stage1_training's tiny RQ-VAE on 32 images: 4 logged steps an epoch, evaluation and preview after
each.
"""
import json
import math
import shutil

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main_stage1
from common.curves import plot_runs, run_curves
from common.runlog import read_metrics
from scripts import plot_run
from tests.test_stage1_training import CONFIG, TINY

TWO_EPOCHS = [*TINY, "dataset.num_samples=32", "experiment.epochs=2"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    main_stage1.main(["-m", CONFIG, "-r", str(results), *TWO_EPOCHS])
    return results / "rqvae"


def events(run_dir) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})  # 0: keep every event
    accumulator.Reload()
    return accumulator


def scalar_steps(accumulator: EventAccumulator, tag: str) -> list[int]:
    return [event.step for event in accumulator.Scalars(tag)]


def test_tensorboard_holds_the_logged_curves_and_the_previews(tiny_run):
    board = events(tiny_run)
    tags = set(board.Tags()["scalars"])
    assert {"train/loss_recon", "train/loss_total", "train/lr", "train/skipped_images", "val/loss_recon",
            "val/usage_d0", "val/perplexity_d0"} <= tags
    assert not {"train/step", "train/epoch", "val/step"} & tags
    assert scalar_steps(board, "train/loss_recon") == list(range(1, 9))
    logged = [r["loss_recon"] for r in read_metrics(str(tiny_run / "metrics.jsonl")) if r["split"] == "train"]
    assert [e.value for e in board.Scalars("train/loss_recon")] == pytest.approx(logged, rel=1e-6)
    assert scalar_steps(board, "val/usage_d0") == [4, 8]
    previews = board.Images("preview")
    assert [image.step for image in previews] == [4, 8]
    with Image.open(tiny_run / "images" / "epoch0002.png") as grid:  # the saved grid, pixel size and all
        assert (previews[-1].width, previews[-1].height) == grid.size


def test_resumed_run_continues_the_same_tensorboard_curves(tiny_run, tmp_path):
    run = tmp_path / "rqvae"
    shutil.copytree(tiny_run, run)  # an interrupted run that got to step 8; resumed from step 4
    main_stage1.main(["-m", CONFIG, "-r", str(tmp_path), *TWO_EPOCHS, "-l", str(run / "epoch1_model.pt"), "--resume"])
    assert len(list(run.glob("events.out.tfevents.*"))) == 2
    board = events(run)
    assert scalar_steps(board, "train/loss_recon") == list(range(1, 9))  # steps 5-8 once, not twice
    assert scalar_steps(board, "val/loss_recon") == [4, 8]
    assert [image.step for image in board.Images("preview")] == [4, 8]


def test_tensorboard_false_writes_no_event_files(tmp_path):
    main_stage1.main(["-m", CONFIG, "-r", str(tmp_path), *TINY, "experiment.epochs=1", "experiment.max_steps=2",
                      "experiment.tensorboard=false"])
    run = tmp_path / "rqvae"
    assert len(read_metrics(str(run / "metrics.jsonl"))) == 2
    assert not list(run.glob("events.out.tfevents.*"))


def write_records(run_dir, records: list[dict]) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_curves_of_a_resumed_run_keep_the_resumed_values(tmp_path):
    run = tmp_path / "prior"
    write_records(run, [*({"split": "train", "step": s, "epoch": 0, "loss": 10.0 - s, "lr": 1e-3} for s in (1, 2, 3)),
                        {"split": "val", "step": 3, "epoch": 1, "val_loss": 7.5},
                        *({"split": "train", "step": s, "epoch": 0, "loss": 20.0 - s, "lr": 1e-3} for s in (2, 3, 4)),
                        {"split": "val", "step": 3, "epoch": 1, "val_loss": 6.5}])
    curves = run_curves(str(run))
    assert curves["train/loss"] == ([1, 2, 3, 4], [9.0, 18.0, 17.0, 16.0])
    assert curves["val/loss"] == ([3], [6.5])
    assert set(curves) == {"train/loss", "train/lr", "val/loss"}


def prior_records(steps: int, loss: float) -> list[dict]:
    """What a prior's run logs: loss, lr and grad_norm per step, val_loss after the last."""
    return [*({"split": "train", "step": s, "epoch": 0, "loss": loss / s, "lr": 1e-3 * s, "grad_norm": 1.0}
              for s in range(1, steps + 1)),
            {"split": "val", "step": steps, "epoch": 1, "val_loss": loss / steps}]


def test_plot_overlays_runs_in_one_png(tmp_path):
    write_records(tmp_path / "rqtransformer", prior_records(8, 5.0))
    write_records(tmp_path / "mar", prior_records(12, 2.0))
    path = tmp_path / "plots" / "curves.png"
    panels = plot_runs([str(tmp_path / "rqtransformer"), str(tmp_path / "mar")], str(path))
    assert panels == ["train/loss", "train/grad_norm", "train/lr", "val/loss"]  # losses first, training first
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1600, 350)  # four 4 x 3 inch panels and the legend


def test_plot_script_draws_a_training_run_and_refuses_a_folder_without_metrics(tiny_run, tmp_path, capsys):
    assert plot_run.main([str(tiny_run), "--output", str(tmp_path / "out")]) == str(tmp_path / "out" / "curves.png")
    curves = run_curves(str(tiny_run))
    assert {"train/loss_recon", "train/loss_disc", "train/lr", "val/loss_recon", "val/usage_d0"} <= set(curves)
    assert f"{len(curves)} curves of 1 run(s)" in capsys.readouterr().out
    with Image.open(tmp_path / "out" / "curves.png") as image:  # rows of four 4 x 3 inch panels, at 100 dpi
        assert image.format == "PNG" and image.size == (1600, 300 * math.ceil(len(curves) / 4) + 50)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as stopped:
        plot_run.main([str(tmp_path / "empty")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code != 0 and len(lines) == 1
    assert "empty" in lines[0] and "no metrics.jsonl" in lines[0]
