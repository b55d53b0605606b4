"""How every benchmark that puts our code beside official code measures, so that no table is recorded under contention.

The implementations take turns, and the order of a turn reverses every round (ours, official; official,
ours; ...), so load from elsewhere and warm caches hit both alike; each gets at least five timed runs
by default and is reported as the median with its spread (min-max). The 1-minute load average is
printed at the start and at the end and checked before and after every setting: above the number of
cores this process may run on, the machine is busy and the benchmark stops with one line and exit
status 2 instead of reporting that setting, unless `--allow-busy` is given, which reports under an
"UNDER LOAD: not for recording" banner.

The load average counts the benchmark's own threads too. When they fill every core (2 threads on 2
cores), the load of an idle machine sits just above the core count (2.07-2.10 measured), so there the
limit is the benchmark's threads plus half a core of other work; with fewer threads than cores the
limit is the core count, as it was.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Generic, Mapping, TypeVar

import torch
from tqdm import tqdm

from common.errors import ConfigError, UserError

T = TypeVar("T")
DEFAULT_REPEATS = 5
BANNER = "!" * 24 + " UNDER LOAD: not for recording " + "!" * 24


class BusyMachine(UserError):
    """The load average is above the limit: the numbers would say more about other jobs than about ours."""


def add_protocol_flags(parser: argparse.ArgumentParser, repeats: int = DEFAULT_REPEATS) -> None:
    """--repeats (timed runs per implementation and setting, default `repeats`) and --allow-busy."""
    parser.add_argument("--repeats", type=int, default=repeats,
                        help="timed runs per implementation and setting, in alternating turns; the median is "
                             f"reported with the min-max spread (default {repeats})")
    parser.add_argument("--allow-busy", action="store_true",
                        help="measure even when the load average is above the limit (the core count, or the "
                             "benchmark's own threads + 0.5 where they fill every core), under an "
                             "'UNDER LOAD: not for recording' banner (for development only)")


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> float:
    """The 1-minute load average of the machine."""
    return os.getloadavg()[0]


@dataclass
class Spread:
    """Median and range of repeated timings, in seconds."""

    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def __str__(self) -> str:
        return f"{self.median:.3g} ({min(self.seconds):.3g}-{max(self.seconds):.3g})"


def speedup(reference: Spread, ours: Spread) -> str:
    """reference / ours: the ratio of the medians, and the range of the ratios of runs taken in the same turn."""
    per_turn = [r / o for r, o in zip(reference.seconds, ours.seconds)]
    return f"{reference.median / ours.median:.2f}x ({min(per_turn):.2f}-{max(per_turn):.2f})"


@dataclass
class Runs(Generic[T]):
    """The timed runs of one implementation at one setting: seconds and what each run returned."""

    seconds: list[float] = field(default_factory=list)
    outputs: list[T] = field(default_factory=list)

    @property
    def spread(self) -> Spread:
        return Spread(self.seconds)


@dataclass
class Protocol:
    """The load checks and the alternating timed runs of one benchmark invocation."""

    repeats: int
    allow_busy: bool
    own_threads: int = 1
    cores: int = field(default_factory=usable_cores)
    loads: list[float] = field(default_factory=list)
    busy: bool = False

    @classmethod
    def start(cls, args: argparse.Namespace) -> "Protocol":
        """Check the flags of `add_protocol_flags`, print the load at the start and refuse a busy machine.
        `args.device` and `args.threads` say how many threads the benchmark itself keeps busy."""
        if args.repeats < 1:
            raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
        on_cpu = torch.device(args.device).type == "cpu"
        protocol = cls(args.repeats, args.allow_busy, (args.threads or torch.get_num_threads()) if on_cpu else 1)
        protocol.check("the start", report=True)
        return protocol

    @property
    def load_limit(self) -> float:
        """The highest 1-minute load that is not a busy machine: the core count, or where the benchmark's own
        threads fill every core, those threads and half a core of other work."""
        return max(float(self.cores), self.own_threads + 0.5)

    def check(self, when: str, report: bool = False) -> float:
        """The load average now (printed when `report`); above `load_limit` a BusyMachine error, or with
        --allow-busy the banner."""
        load = load_average()
        self.loads.append(load)
        if report:
            print(f"load average (1 min) at {when}: {load:.2f} ({self.cores} cores, {self.own_threads} threads of "
                  f"ours, limit {self.load_limit:.2f})", flush=True)
        if load > self.load_limit:
            if not self.allow_busy:
                raise BusyMachine(f"load average (1 min) {load:.2f} at {when} is above {self.load_limit:.2f} "
                                  f"({self.cores} cores, {self.own_threads} threads of ours): nothing is reported "
                                  "from a busy machine; rerun when it is idle (or pass --allow-busy for numbers not "
                                  "to be recorded)")
            if not self.busy:
                print(BANNER, flush=True)
            self.busy = True
        return load

    def alternate(self, runs: Mapping[str, Callable[[], tuple[float, T]]], setting: str) -> dict[str, Runs[T]]:
        """Call every `runs[name]()` (which times itself and returns (seconds, output)) `repeats` times in turns
        whose order reverses every round; the load is checked before and after."""
        self.check(f"the start of {setting}")
        results: dict[str, Runs[T]] = {name: Runs() for name in runs}
        names = list(runs)
        with tqdm(total=self.repeats * len(names), desc=setting, unit="run", leave=False) as bar:
            for round_index in range(self.repeats):
                for name in names if round_index % 2 == 0 else reversed(names):
                    seconds, output = runs[name]()
                    results[name].seconds.append(seconds)
                    results[name].outputs.append(output)
                    bar.update()
        self.check(f"the end of {setting}")
        return results

    def finish(self) -> None:
        """The closing load check and a summary line (and the banner again if any check found the machine busy)."""
        self.check("the end", report=True)
        print(f"load average (1 min): {self.loads[0]:.2f} at the start, {self.loads[-1]:.2f} at the end, at most "
              f"{max(self.loads):.2f} over {len(self.loads)} checks (limit {self.load_limit:.2f}); {self.cores} "
              f"cores; times are the median (min-max) of {self.repeats} runs taken in turns")
        if self.busy:
            print(BANNER, flush=True)


def device_note(device: torch.device) -> str:
    """Where a table was measured: the device, and on a CPU the number of torch threads."""
    return f"{device}" + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else "")


def seeded_labels(num_classes: int, batch_size: int, seed: int, device: torch.device) -> torch.Tensor:
    """The class labels of one timed batch: the same for ours and the official sampler, and from run to run."""
    return torch.randint(0, num_classes, (batch_size,), generator=torch.Generator().manual_seed(seed)).to(device)


def print_header(header: str) -> None:
    """A table's column names and the rule under them."""
    print(header)
    print("-" * len(header), flush=True)


def timed_call(call: Callable[[], T], device: torch.device, clock: Callable[[], float] = time.perf_counter
               ) -> tuple[float, T]:
    """Seconds of one `call()` (CUDA work waited for) and what it returned."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    output = call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - start, output
