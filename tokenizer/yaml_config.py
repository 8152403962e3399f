"""Typed configs from YAML: the one loader behind every config of the suite.

Configs are (frozen or plain) dataclasses. `build_config` turns a YAML mapping into one, recursively, and refuses
unknown keys and ill-typed values with an error naming the key (`configs/x.yaml.engine.max_steps: expected int,
got 'x'`), so a typo never silently falls back to a default. `apply_overrides` applies command-line
`key.sub=value` overrides to the mapping first; `load_run_config` does both for a file.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml


# YAML 1.1 reads these words as booleans; on a command line they are meant as words (`mixed_precision=no`).
_WORDS_NOT_BOOLEANS = {"yes", "no", "on", "off", "y", "n"}


def _parse_override_value(text: str) -> Any:
    if text.strip().lower() in _WORDS_NOT_BOOLEANS:
        return text.strip()
    return yaml.safe_load(text)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `key.sub=value` applied; values are parsed as YAML (`1e-4`, `[1, 2]`,
    `true`, `null`), except yes/no/on/off, which stay words. A key must already exist in `data`, so a typo is an error instead of a silent new entry."""
    result = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override '{item}' is not of the form key.sub=value")
        dotted, text = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = result
        for depth, key in enumerate(keys):
            if not isinstance(node, dict) or key not in node:
                where = ".".join(keys[:depth]) or "the top level"
                known = sorted(node) if isinstance(node, dict) else []
                raise ValueError(f"override '{item}': no key '{key}' under {where} (known: {known})")
            if depth == len(keys) - 1:
                node[key] = _parse_override_value(text)
            else:
                node = node[key]
    return result


def build_config(cls: type, data: Any, where: str = "config") -> Any:
    """Instantiate the dataclass `cls` from a mapping, recursively. Unknown keys and ill-typed values are
    errors naming the key; missing keys take the dataclass defaults."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; known keys: {known}")
    return cls(**{key: _coerce(hints[key], value, f"{where}.{key}") for key, value in data.items()})


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build_config(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {args}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ValueError(f"{where}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(a, v, where) for a, v in zip(args, value))
        item = args[0] if args else Any
        return origin(_coerce(item, v, where) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # PyYAML reads `1e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, str, bool) and type(value) is hint:
        return value
    if origin is typing.Literal:
        if value in args:
            return value
        raise ValueError(f"{where}: expected one of {list(args)}, got {value!r}")
    raise ValueError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain YAML-safe data (tuples become lists)."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value
    return plain(dataclasses.asdict(config))


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The top-level mapping of a YAML file; anything else is an error naming the file."""
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {what} must be a YAML mapping, got {type(data).__name__}")
    return data


def load_run_config(cls: type, path: str | Path, overrides: Sequence[str] = ()) -> tuple[Any, dict[str, Any]]:
    """Read a YAML run config, apply `key.sub=value` overrides, build `cls`. Returns (config, resolved data)
    where the resolved data is what the run really used (the engine saves it next to the checkpoints)."""
    data = read_yaml_mapping(path, "a run config")
    config = build_config(cls, apply_overrides(data, overrides), str(path))
    return config, config_to_dict(config)


class NamedYamlConfig:
    """Mixin for a dataclass config with a `name` field: YAML and dict in and out through `build_config`.

    A file that does not set `name` is named after its stem (`configs/gpstoken_m128.yaml` -> `gpstoken_m128`).
    """

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config"):
        return build_config(cls, data, where)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_yaml(cls, path: str | Path):
        data = read_yaml_mapping(path, f"a {cls.__name__}")
        data.setdefault("name", Path(path).stem)
        return build_config(cls, data, str(path))

    def to_yaml(self, path: str | Path) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            yaml.safe_dump(self.to_dict(), handle, sort_keys=False)
