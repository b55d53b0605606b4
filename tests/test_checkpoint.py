import os
import pickle
import random

import numpy as np
import pytest
import torch

from common.checkpoint import (capture_rng_state, load_checkpoint, load_file, restore_rng_state, save_checkpoint,
                               strict_load)
from common.errors import CheckpointError


def test_round_trip_with_rng_state(tmp_path):
    model = torch.nn.Linear(3, 4)
    path = str(tmp_path / "ckpt.pt")
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    save_checkpoint(path, {"model": model.state_dict(), "config": {"a": [1, 2]}, "rng": capture_rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    loaded = load_checkpoint(path)
    assert loaded["config"] == {"a": [1, 2]}
    torch.testing.assert_close(loaded["model"]["weight"], model.weight.detach())
    restore_rng_state(loaded["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(expected[0], again[0])
    np.testing.assert_array_equal(expected[1], again[1])
    assert expected[2] == again[2]
    assert [f for f in os.listdir(tmp_path) if "tmp" in f] == []


def test_truncated_file_is_refused(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"model": torch.nn.Linear(64, 64).state_dict()})
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_checkpoint(path)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"model": Payload()}, path)
    with pytest.raises(CheckpointError, match="contains Python objects or code"):
        load_file(path)


def test_foreign_and_non_checkpoint_files_are_refused(tmp_path):
    foreign = str(tmp_path / "foreign.pt")
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a checkpoint of this codebase"):
        load_checkpoint(foreign)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pt"):
        load_checkpoint(str(text))
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(CheckpointError):
        load_checkpoint(str(raw))


@pytest.mark.parametrize("content, phrase", [
    (b"<!DOCTYPE html>\n<html><body>Sign in</body></html>", "it is an HTML or XML page"),
    (bytes(range(1, 120)), "not a PyTorch checkpoint file"),
    (b"", "the file is empty"),
    (b"\x80\x02\xff\xfe random bytes", "not a checkpoint"),
])
def test_files_that_are_no_checkpoint_are_named_for_what_they_are(tmp_path, content, phrase):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=phrase) as info:
        load_file(str(path))
    assert "Python objects or code" not in str(info.value)
    with pytest.raises(CheckpointError, match="a folder, not a checkpoint file"):
        load_file(str(tmp_path))


def test_strict_load_lists_offending_keys():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    state = model.state_dict()
    state.pop("1.bias")
    state["0.weight"] = torch.zeros(5, 2)
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        strict_load(model, state, "x.pt")
    text = str(info.value)
    assert "missing keys: 1.bias" in text and "unexpected keys: extra.weight" in text
    assert "0.weight (5, 2) vs (3, 2)" in text
