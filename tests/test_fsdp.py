"""FSDP (experiment.fsdp) over two gloo processes trains as DDP does, and its checkpoints are whole, load without
FSDP and resume exactly; DDP over two processes trains the next-patch stages as one process does. The two-process
runs are those of tests/two_process_runs.py (the `two_process_runs` fixture)."""
from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor

import main_stage2
from common.checkpoint import strict_load
from common.dcp import join_folder
from common.fsdp import recompute_blocks
from common.runlog import read_metrics
from npp.gpt import GPT
from scripts import sample
from tests.helpers import refused_in_process, train_records, write_learnable_codes
from tests.two_process_runs import VQ, gpt_args, patch_stage_args


def checkpoint(path) -> dict:
    return torch.load(path, weights_only=True)


def assert_same_training(a, b) -> None:
    """Two runs logged the same steps with losses and gradient norms equal to float tolerance."""
    x, y = train_records(a), train_records(b)
    assert [r["step"] for r in x] == [r["step"] for r in y] and len(x) > 0
    for r, s in zip(x, y):
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-4)
        if "grad_norm" in r:
            assert r["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-3)


def assert_close_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_fsdp_trains_a_tiny_gpt_through_the_patch_stages_as_ddp_does(two_process_runs):
    ddp, fsdp = two_process_runs / "gpt_ddp" / "npp-gpt", two_process_runs / "gpt_fsdp" / "npp-gpt"
    assert_same_training(ddp, fsdp)
    records = train_records(fsdp)
    assert [r["patch_size"] for r in records] == [4] * 4 + [1] * 4
    assert len([r for r in records if "grad_norm" in r]) == 4  # two micro-batches per update, clipped
    assert records[-1]["loss"] < records[0]["loss"]
    a, b = checkpoint(ddp / "last.pt"), checkpoint(fsdp / "last.pt")
    assert_close_weights(a["model"], b["model"])
    assert_close_weights(a["ema"]["shadow"], b["ema"]["shadow"])
    assert b["optimizer"]["state"][0]["exp_avg"].shape == a["optimizer"]["state"][0]["exp_avg"].shape  # whole
    # the FSDP checkpoint is one file of whole tensors: a GPT without FSDP takes it as it is
    model = GPT.from_config(b["config"]["arch"])
    strict_load(model, b["model"], "last.pt")
    evaluations = [r for r in read_metrics(str(fsdp / "metrics.jsonl")) if r["split"] == "val"]
    assert len(evaluations) == 1 and 0 < evaluations[0]["val_loss"] < 5  # the EMA weights, gathered
    assert (fsdp / "images" / "epoch0002.png").is_file()  # previews sampled on both ranks


def test_fsdp_trains_a_tiny_rq_transformer_and_its_ema_as_ddp_does(two_process_runs):
    ddp, fsdp = two_process_runs / "rq_ddp" / "rqtransformer", two_process_runs / "rq_fsdp" / "rqtransformer"
    assert_same_training(ddp, fsdp)
    a, b = checkpoint(ddp / "last.pt"), checkpoint(fsdp / "last.pt")
    assert_close_weights(a["model"], b["model"])
    assert_close_weights(a["ema"]["shadow"], b["ema"]["shadow"])
    assert b["ema"]["num_updates"] == a["ema"]["num_updates"] == 4


def test_fsdp_resumes_exactly_from_its_sharded_checkpoint_by_itself(two_process_runs, tmp_path, capsys):
    full, resumed = two_process_runs / "gpt_fsdp" / "npp-gpt", two_process_runs / "gpt_fsdp_dcp" / "npp-gpt"
    assert train_records(resumed) == train_records(full)  # stopped at step 6 (mid-epoch), restarted without flags
    assert "resumed from" in (resumed / "train.log").read_text()
    assert not (resumed / "last.pt").exists() and (resumed / "last.dcp" / "meta.pt").is_file()
    join_folder(str(resumed / "last.dcp"), str(tmp_path / "joined.pt"))
    joined, whole = checkpoint(tmp_path / "joined.pt"), checkpoint(full / "last.pt")
    assert all(torch.equal(joined["model"][k], whole["model"][k]) for k in whole["model"])
    assert joined["position"] == whole["position"]
    # a sampling script given the folder where it takes a file: one line
    line = refused_in_process(capsys, sample.main, ["-v", VQ, "-a", str(resumed / "last.dcp"),
                                                    "--output", str(tmp_path / "samples")])
    assert "sharded checkpoint folder" in line and "dcp_to_file.py" in line


def test_a_ddp_checkpoint_starts_an_fsdp_run(two_process_runs):
    ddp, continued = two_process_runs / "gpt_ddp" / "npp-gpt", two_process_runs / "gpt_from_ddp" / "npp-gpt"
    assert [r["step"] for r in train_records(continued)] == [5, 6, 7, 8]
    assert_close_weights(checkpoint(ddp / "last.pt")["model"], checkpoint(continued / "last.pt")["model"])


def test_fsdp_trains_a_tokenizer_against_its_discriminator(two_process_runs):
    run = two_process_runs / "rqvae_fsdp" / "rqvae"
    assert len(train_records(run)) == 1 and "2 process(es)" in (run / "train.log").read_text()
    saved = checkpoint(run / "last.pt")
    assert {"model", "discriminator", "optimizer", "disc_optimizer"} <= set(saved)
    assert not any(isinstance(t, DTensor) for t in saved["model"].values())
    assert (run / "images" / "epoch0001.png").is_file()  # reconstructions with the gathered weights


def test_two_processes_train_the_patch_stages_as_one_process_at_the_same_global_batch(two_process_runs, tmp_path):
    codes = str(two_process_runs / "codes")
    main_stage2.main([*patch_stage_args(codes), "-r", str(tmp_path), "experiment.batch_size=8"])
    x, y = train_records(tmp_path / "npp-gpt"), train_records(two_process_runs / "gpt_stages" / "npp-gpt")
    assert [r["patch_size"] for r in x] == [r["patch_size"] for r in y] == [16] * 4 + [4] * 4 + [1] * 8
    assert [r["lr"] for r in x] == [r["lr"] for r in y]
    assert x[-1]["loss"] < x[0]["loss"] - 0.5  # it learns, so equal steps mean something
    for r, s in zip(x, y):
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-4)
        assert r["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-3)
    a = checkpoint(tmp_path / "npp-gpt" / "last.pt")["model"]
    b = checkpoint(two_process_runs / "gpt_stages" / "npp-gpt" / "last.pt")["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_grad_checkpointing_recomputes_each_block_in_the_backward_pass_and_changes_no_gradient():
    torch.manual_seed(0)
    model = GPT(dim=32, n_layer=2, n_head=2, vocab_size=64, num_classes=4, image_tokens=16)
    codes, labels = torch.randint(0, 64, (3, 4, 4)), torch.tensor([0, 1, 2])

    def gradients() -> list[torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(1)  # class dropout draws the same
        model.loss(codes, labels)[0].backward()
        return [p.grad.clone() for p in model.parameters()]

    expected = gradients()
    assert recompute_blocks(model) == 2
    calls = []
    for layer in model.layers:
        layer.attention.register_forward_hook(lambda *_: calls.append(1))
    assert all(torch.allclose(a, b) for a, b in zip(expected, gradients()))
    assert len(calls) == 4  # each block's forward, and again in the backward pass
    with torch.no_grad():
        model.loss(codes, labels)
    assert len(calls) == 6  # without gradients: once
    assert list(model.state_dict()) == list(GPT(dim=32, n_layer=2, n_head=2, vocab_size=64, num_classes=4,
                                                image_tokens=16).state_dict())  # the names stay


def test_a_global_batch_the_processes_do_not_divide_is_one_line(tmp_path, capsys):
    args = [*gpt_args(write_learnable_codes(tmp_path / "codes")), "-r", str(tmp_path), "experiment.batch_size=8",
            "experiment.total_batch_size=12"]
    line = refused_in_process(capsys, main_stage2.main, args)
    assert "experiment.total_batch_size 12" in line and "8 x 1 process(es)" in line
    assert not (tmp_path / "npp-gpt").exists()
