"""Strict loading of frozen, keyword-only config dataclasses (one source for CLI flags, YAML and JSON)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value, key or file is wrong; the message names the key path."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# type -> (accepted Python types, its name in messages); a bool is accepted as a bool only
_SCALARS = {float: ((int, float), "a number"), int: (int, "an integer"), bool: (bool, "true/false"),
            str: (str, "a string")}


def _coerce(value: Any, tp: Any, path: str) -> Any:  # noqa: C901 - one branch per supported type
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            with contextlib.suppress(ConfigError):
                if arg is not type(None):
                    return _coerce(value, arg, path)
        raise ConfigError(f"{path}: {value!r} does not match {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, _path=path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if tp in _SCALARS:
        kinds, what = _SCALARS[tp]
        if not isinstance(value, kinds) or (isinstance(value, bool) and tp is not bool):
            raise ConfigError(f"{path}: expected {what}, got {type(value).__name__} {value!r}")
        return float(value) if tp is float else value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], *, _path: str = "") -> T:
    """Build config dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f" in {_path}" if _path else ""
        raise ConfigError(f"unknown config key(s){where} for {cls.__name__}: {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, field in fields.items():
        key_path = f"{_path}.{name}" if _path else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key_path)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key {key_path!r} for {cls.__name__}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{_path or cls.__name__}: {exc}") from exc


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-safe dict of a config dataclass (tuples become lists)."""
    def convert(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v

    return convert(cfg)


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) as None: JSON has no NaN, and strict parsers refuse it."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return finite_json(obj.item())
    return obj


def strict_json(obj: Any) -> str:
    """Indented, key-sorted JSON that any strict parser reads (non-finite numbers written as null)."""
    return json.dumps(finite_json(obj), indent=2, sort_keys=True, default=str, allow_nan=False)


def replace(cfg: T, **changes: Any) -> T:
    """``dataclasses.replace`` that validates the new values like ``from_dict``."""
    return from_dict(type(cfg), {**to_dict(cfg), **changes})


def load_file(cls: type[T], path: str | Path) -> T:
    """Load a config from a local ``.json`` / ``.yaml`` / ``.yml`` file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    is_yaml = path.suffix in (".yaml", ".yml")
    try:
        data = (yaml.safe_load(text) or {}) if is_yaml else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid {'YAML' if is_yaml else 'JSON'}: {exc}") from exc
    return from_dict(cls, data)
