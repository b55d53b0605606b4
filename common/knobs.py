"""Sampling knobs: each prior declares its own, with defaults, and every sampling script reads them.

A prior class has `SAMPLING_KNOBS`, a dict from the keyword its `generate` takes to a `Knob`
(type, default, range, command-line spellings). Scripts build their flags from the knobs of every
registered prior (`add_knob_flags`), accept `key=value` arguments as well, and resolve the values
for the prior they load (`resolve_knobs`): the command line first, then the checkpoint's own
defaults, then the knob's. A value a prior does not take is refused in one line.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import yaml

from common.errors import ConfigError


@dataclass(frozen=True)
class Knob:
    kind: type  # int, float or str
    default: Any
    flags: tuple[str, ...] = ()  # command-line spellings; the knob's own name always works as key=value
    per_depth: bool = False  # one value, or one per code depth
    optional: bool = False  # None (off) is a value
    choices: tuple | None = None
    valid: Callable[[Any], bool] | None = None
    rule: str = ""  # what `valid` asks, for the error line
    doc: str = ""

    def check(self, name: str, value: Any, depth: int = 1) -> Any:
        """The value coerced to the knob's type (a list of `depth` values for per-depth knobs)."""
        flag = self.flags[-1] if self.flags else name
        if self.per_depth:
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            if len(values) == 1:
                values = values * depth
            if len(values) != depth:
                raise ConfigError(f"{flag} takes one value or one per depth ({depth}), got {len(values)}: {values}")
            return [self.check_one(flag, v) for v in values]
        if isinstance(value, (list, tuple)):
            if len(value) != 1:
                raise ConfigError(f"{flag} takes one value, got {len(value)}: {list(value)}")
            value = value[0]
        return self.check_one(flag, value)

    def check_one(self, flag: str, value: Any) -> Any:
        if value is None and (self.optional or self.default is None):
            return None
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if self.kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, self.kind) or isinstance(value, bool):
            raise ConfigError(f"{flag} must be {self.kind.__name__}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{flag} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        if self.valid is not None and not self.valid(value):
            raise ConfigError(f"{flag} must be {self.rule}, got {value}")
        return value


def token_knobs(per_depth: bool) -> dict[str, Knob]:
    """The knobs of next-token sampling: temperature, top-k, top-p (per depth for stacked codes), guidance."""
    return {
        "temperature": Knob(float, 1.0, ("-t", "--temp"), valid=lambda t: t > 0, rule="> 0",
                            doc="divides the logits"),
        "top_k": Knob(int, None, ("--top-k",), per_depth, optional=True, valid=lambda k: k >= 1, rule=">= 1",
                      doc="keep the k most likely codes (off: all)"),
        "top_p": Knob(float, None, ("--top-p",), per_depth, optional=True, valid=lambda p: 0 < p <= 1,
                      rule="in (0, 1]", doc="keep the smallest set of codes holding probability p (off: all)"),
        "cfg_scale": Knob(float, 1.0, ("--cfg", "--cfg-scale"), doc="classifier-free guidance scale (1: off)"),
    }


def token_folder_name(knobs: Mapping[str, Any]) -> str:
    """`temp_<t>_top_k_<k>_top_p_<p>[_cfg_<s>]`, the official RQ-Transformer result-folder naming."""
    return (f"temp_{knobs['temperature']:.1f}_top_k_{_joined(knobs['top_k'])}_top_p_{_joined(knobs['top_p'])}"
            + (f"_cfg_{knobs['cfg_scale']}" if knobs["cfg_scale"] != 1.0 else ""))


def _joined(values: Any) -> str:
    """One value per depth as a folder-name part: the value if all agree, else all of them joined by '_'."""
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    return str(values[0]) if len(set(values)) == 1 else "_".join(map(str, values))


# ----------------------------------------------------------------------------------------------
# Command lines
# ----------------------------------------------------------------------------------------------

KNOB_DEST = "knob:"  # argparse dest prefix of knob flags
ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")


def add_knob_flags(parser: argparse.ArgumentParser, schemas: Iterable[Mapping[str, Knob]]) -> None:
    """One flag per spelling used by any of the schemas (e.g. `--cfg` of every guided prior), plus
    `--<name>` for every knob; all default to None (not given). A spelling takes several values when
    any prior reads one value per depth through it."""
    flags: dict[str, tuple[Knob, bool]] = {}
    for schema in schemas:
        for name, knob in schema.items():
            for flag in (*knob.flags, f"--{name}"):
                first, per_depth = flags.get(flag, (knob, False))
                flags[flag] = (first, per_depth or knob.per_depth)
    documented: set[int] = set()
    for flag, (knob, per_depth) in flags.items():
        help_text = argparse.SUPPRESS if id(knob) in documented else knob.doc
        documented.add(id(knob))
        parser.add_argument(flag, dest=KNOB_DEST + flag, default=None, nargs="+" if per_depth else None,
                            type=knob.kind, help=help_text, metavar=knob.kind.__name__.upper())


def split_assignments(argv: Iterable[str]) -> tuple[list[str], list[str]]:
    """(the other arguments, the `name=value` ones), taken apart before argparse sees them, so that an
    assignment after a flag of several values is not read as one of them."""
    rest, assignments = [], []
    for argument in argv:
        (assignments if ASSIGNMENT.match(argument) else rest).append(argument)
    return rest, assignments


def given_knobs(args: argparse.Namespace, assignments: Iterable[str] = ()) -> dict[str, Any]:
    """{flag or name: value} of the knobs given on the command line: flags, then `name=value` arguments."""
    given = {dest[len(KNOB_DEST):]: value for dest, value in vars(args).items()
             if dest.startswith(KNOB_DEST) and value is not None}
    for argument in assignments:
        name, _, text = argument.partition("=")
        given[name] = yaml.safe_load(text) if text else None
    return given


def resolve_knobs(schema: Mapping[str, Knob], given: Mapping[str, Any], defaults: Mapping[str, Any],
                  depth: int = 1, prior_name: str = "this prior") -> dict[str, Any]:
    """The value of every knob of `schema`: given on the command line, else the checkpoint's default, else
    the knob's. Anything given that the schema does not take is a ConfigError."""
    spellings = {spelling: name for name, knob in schema.items() for spelling in (name, f"--{name}", *knob.flags)}
    unknown = [key for key in given if key not in spellings]
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a sampling knob of {prior_name} (its knobs: {', '.join(schema)})")
    chosen = {spellings[key]: value for key, value in given.items()}
    return {name: knob.check(name, chosen.get(name, defaults.get(name, knob.default)), depth)
            for name, knob in schema.items()}
