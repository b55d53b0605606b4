"""YAML configs: plain data in, a validated `Config` out, with dotted command-line overrides.

A schema is a nested dict whose leaves are `Field`s. Validation fills defaults, coerces
numbers written as strings (`1e-4` is a string in YAML 1.1) and reports the file and the
dotted key of anything unknown, missing or mistyped. A section that holds `OPEN` as the key
`"*"` accepts extra keys as they are: the official repositories write run-time bookkeeping
into their saved configs, and those files must load unchanged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import yaml

from common.errors import ConfigError
from common.paths import require_file

REQUIRED = object()


@dataclass(frozen=True)
class Field:
    """One leaf of a schema: the accepted type(s), a default (or REQUIRED), optional choices, and for counts
    and sizes the smallest value allowed (of a number, or of each number in a list)."""

    kind: type | tuple[type, ...]
    default: Any = REQUIRED
    items: type | tuple[type, ...] | None = None  # element type of a list
    choices: tuple | None = None
    doc: str = ""
    minimum: float | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


ANY = Field(object, None)  # a free-form value or subtree, kept as written
OPEN = {"*": ANY}  # merge into a section to accept unknown keys verbatim


class Config(dict):
    """A dict with attribute access (`cfg.arch.hparams.n_embed`); nested dicts are Configs too."""

    def __init__(self, data: Mapping[str, Any] | None = None):
        super().__init__()
        for key, value in (data or {}).items():
            self[key] = _wrap(value)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = _wrap(value)

    def to_dict(self) -> dict:
        """Plain nested dicts and lists, for YAML files and `weights_only` checkpoints."""
        return _unwrap(self)

    def get_path(self, dotted: str, default: Any = None) -> Any:
        node: Any = self
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node


def _wrap(value: Any) -> Any:
    if isinstance(value, Mapping) and not isinstance(value, Config):
        return Config(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def _unwrap(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _unwrap(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_unwrap(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------
# Reading files and overrides
# ----------------------------------------------------------------------------------------------

def read_yaml(path: str) -> dict:
    """Read a YAML mapping; a missing, unreadable or malformed file is a ConfigError naming it."""
    require_file(path, "config", ConfigError)
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', error)}") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a config is UTF-8 YAML)") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_overrides(args: Iterable[str]) -> dict[str, Any]:
    """`["optimizer.lr=2e-4", "data.batch_size=8"]` -> {"optimizer.lr": "2e-4", "data.batch_size": 8}."""
    overrides: dict[str, Any] = {}
    for arg in args:
        if arg.startswith("-"):  # what argparse left over: an option it does not know
            raise ConfigError(f"{arg.partition('=')[0]}: unknown option (see --help); after the options, "
                              "give only key.subkey=value overrides")
        key, sep, text = arg.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {arg!r} must look like key.subkey=value")
        try:
            overrides[key] = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            overrides[key] = text
    return overrides


def apply_overrides(data: dict, overrides: Mapping[str, Any], schema: Mapping | None, source: str) -> dict:
    """Set each dotted key in (a copy of) `data`; keys the schema does not know are refused."""
    data = _unwrap(data)
    for dotted, value in overrides.items():
        if schema is not None and not _schema_knows(schema, dotted.split(".")):
            raise ConfigError(f"{source}: unknown override key '{dotted}'")
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return data


def _schema_knows(schema: Mapping, parts: list[str]) -> bool:
    node: Any = schema
    for part in parts:
        if not isinstance(node, Mapping):
            return node is ANY or (isinstance(node, Field) and node.kind in (dict, object))
        if part in node:
            node = node[part]
        elif "*" in node:
            return True
        else:
            return False
    return True


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

_TYPE_NAMES = {int: "an int", float: "a number", str: "a string", bool: "true or false",
               list: "a list", dict: "a mapping", object: "any value"}


def _describe(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)


def _coerce(value: Any, kind: type | tuple[type, ...]) -> tuple[bool, Any]:
    """Return (ok, value) with ints widened to float and numeric strings parsed where a number is asked."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    for k in kinds:
        if k is object:
            return True, value
        if k is bool:
            if isinstance(value, bool):
                return True, value
        elif k is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True, value
        elif k is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return True, float(value)
            if isinstance(value, str):
                try:
                    return True, float(value)
                except ValueError:
                    pass
        elif k is list:
            if isinstance(value, (list, tuple)):
                return True, list(value)
        elif isinstance(value, k):
            return True, value
    return False, value


def _check_field(value: Any, field: Field, key: str, source: str) -> Any:
    if value is None:
        if field.default is None or field.kind is object:
            return None
        raise ConfigError(f"{source}: {key} must be {_describe(field.kind)}, got null")
    ok, value = _coerce(value, field.kind)
    if not ok:
        raise ConfigError(f"{source}: {key} must be {_describe(field.kind)}, got {value!r}")
    if field.items is not None and isinstance(value, list):
        checked = []
        for i, item in enumerate(value):
            ok, item = _coerce(item, field.items)
            if not ok:
                raise ConfigError(f"{source}: {key}[{i}] must be {_describe(field.items)}, got {item!r}")
            checked.append(item)
        value = checked
    if field.minimum is not None:
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, (int, float)) and not isinstance(item, bool) and item < field.minimum:
                raise ConfigError(f"{source}: {key} must be at least {field.minimum}, got {item!r}")
    if field.choices is not None and value not in field.choices:
        choices = ", ".join(str(c) for c in field.choices)
        raise ConfigError(f"{source}: {key} must be one of {choices}, got {value!r}")
    return value


def validate(data: Mapping[str, Any], schema: Mapping[str, Any], source: str, prefix: str = "") -> Config:
    """Check `data` against `schema`, fill defaults, and return a Config; errors name `source` and the key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    out: dict[str, Any] = {}
    extra_field = schema.get("*")
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        spec = schema.get(key)
        if spec is None:
            if extra_field is None:
                known = ", ".join(k for k in schema if k != "*")
                raise ConfigError(f"{source}: unknown key '{dotted}' (known here: {known})")
            out[key] = value
        elif isinstance(spec, Mapping):
            out[key] = validate(value if value is not None else {}, spec, source, f"{dotted}.")
        else:
            out[key] = _check_field(value, spec, dotted, source)
    for key, spec in schema.items():
        if key == "*" or key in out:
            continue
        dotted = f"{prefix}{key}"
        if isinstance(spec, Mapping):
            out[key] = validate({}, spec, source, f"{dotted}.")
        elif spec.required:
            raise ConfigError(f"{source}: missing required key '{dotted}'")
        else:
            out[key] = _unwrap(spec.default)
    return Config(out)


def load_config(path: str, schema: Mapping[str, Any], overrides: Iterable[str] | Mapping[str, Any] = ()) -> Config:
    """Read `path`, apply dotted overrides, validate against `schema`."""
    data = read_yaml(path)
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    data = apply_overrides(data, overrides, schema, path)
    return validate(data, schema, path)


def save_config(config: Mapping[str, Any], path: str) -> None:
    """Write a config as YAML (atomically, so a crash never leaves half a file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(_unwrap(config), f, sort_keys=False)
    os.replace(tmp, path)
