"""The speed benchmarks' protocol: turns that alternate, and no numbers from a busy machine."""
import argparse

import pytest

from benchmarks import protocol
from benchmarks.protocol import BusyMachine, Protocol


def started(monkeypatch, load: float, cores: int, threads: int, allow_busy: bool = False) -> Protocol:
    monkeypatch.setattr(protocol, "load_average", lambda: load)
    monkeypatch.setattr(protocol.os, "sched_getaffinity", lambda pid: set(range(cores)))
    return Protocol.start(argparse.Namespace(repeats=5, allow_busy=allow_busy, device="cpu", threads=threads))


@pytest.mark.parametrize("load, cores, threads", [(2.1, 2, 2), (2.45, 2, 2), (1.9, 2, 1), (7.9, 8, 2)])
def test_an_idle_machine_is_measured(monkeypatch, load, cores, threads):
    assert started(monkeypatch, load, cores, threads).busy is False


@pytest.mark.parametrize("load, cores, threads", [(2.6, 2, 2), (2.1, 2, 1), (8.2, 8, 2)])
def test_a_busy_machine_is_refused(monkeypatch, capsys, load, cores, threads):
    with pytest.raises(BusyMachine, match=f"load average \\(1 min\\) {load:.2f} at the start"):
        started(monkeypatch, load, cores, threads)
    proto = started(monkeypatch, load, cores, threads, allow_busy=True)
    assert proto.busy and "UNDER LOAD" in capsys.readouterr().out


def test_turns_alternate_in_reversed_order(monkeypatch):
    proto = started(monkeypatch, 0.1, 2, 2)
    calls = []
    runs = {name: (lambda name=name: (calls.append(name) or 1.0, name)) for name in ("ours", "official")}
    results = proto.alternate(runs, "setting")
    assert calls == ["ours", "official", "official", "ours", "ours", "official", "official", "ours", "ours",
                     "official"]
    assert results["ours"].spread.median == 1.0 and results["official"].outputs == ["official"] * 5
