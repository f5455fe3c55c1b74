"""The one config layer of every command: a YAML / JSON file, then flags, then ``--set KEY=VALUE``, into a
typed config dataclass (``clipcap_core.configs.from_dict``: unknown keys and wrong types fail, naming the key).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

Fields = Mapping[str, tuple[str, str]]
MAX_CONFIG_BYTES = 1 << 20  # a config file is a few hundred bytes; anything near 1 MiB is not one


def _error(message: str) -> Exception:
    from clipcap_core.configs import ConfigError

    return ConfigError(message)


def load_file(path: str | None) -> dict[str, Any]:
    """A YAML (``.yaml`` / ``.yml``, ``safe_load``) or JSON config file as a dict; ``{}`` without a path."""
    if not path:
        return {}
    import yaml

    p = Path(path)
    if not p.is_file():
        raise _error(f"config file {path} does not exist or is not a file")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise _error(f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes")
    text = p.read_text()
    try:
        data = yaml.safe_load(text) if path.endswith((".yaml", ".yml")) else json.loads(text)
    except (yaml.YAMLError, ValueError) as exc:
        raise _error(f"config file {path} is not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'}: "
                     f"{exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _error(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else in ``over`` replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out.get(k) or {}, v) if isinstance(v, Mapping) else v
    return out


def flags(args: argparse.Namespace, fields: Fields, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The flags that were given (not None), as a nested mapping."""
    data: dict[str, Any] = {}
    for dest, (section, name) in fields.items():
        value = getattr(args, dest, None)
        if value is None or dest in skip:
            continue
        node = data
        for part in section.split(".") if section else ():
            node = node.setdefault(part, {})
        node[name] = value
    return data


def apply_sets(data: dict[str, Any], sets: list[str] | None) -> None:
    """``--set a.b=VALUE`` (VALUE parsed as YAML) into ``data``; under ``model_overrides`` the rest of the key
    stays one dotted key (``--set model_overrides.mapping.clip_length=10``)."""
    import yaml

    for item in sets or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise _error(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise _error(f"--set {key}: the value is not valid YAML: {exc}") from exc
        if key.startswith("model_overrides."):
            data.setdefault("model_overrides", {})[key.split(".", 1)[1]] = value
            continue
        *parents, last = key.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise _error(f"--set {key}: {p!r} is not a config section")
        node[last] = value


def collect(args: argparse.Namespace, fields: Fields, *, base: Mapping[str, Any] | None = None,
            extra: Mapping[str, Any] | None = None, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """``base`` < ``--config`` file < flags (then ``extra``, values a command derives from its flags) <
    ``--set``, as one nested mapping."""
    data = merge(base or {}, load_file(getattr(args, "config", None)))
    data = merge(merge(data, flags(args, fields, skip=skip)), extra or {})
    apply_sets(data, getattr(args, "set", None))
    return data


def from_args(args: argparse.Namespace, ref: str, *, extra: Mapping[str, Any] | None = None) -> Any:
    """The config ``module:Class`` from ``--config``, its flags (``flags.add(p, ref)``) and ``--set``, validated."""
    import importlib

    from pipelines.commands import flags

    module, _, name = ref.partition(":")
    fields = flags.fields(ref)
    return build(getattr(importlib.import_module(module), name), collect(args, fields, extra=extra), fields)


def build(cls: type, data: Mapping[str, Any], fields: Fields | None = None) -> Any:
    """``from_dict`` with every failure a ConfigError (a dataclass ``__post_init__`` may raise ValueError /
    TypeError): the CLI turns it into one line and exit code 2, before any work. A required top-level field
    that is missing is named by its flag in ``fields``."""
    from clipcap_core.configs import ConfigError, from_dict

    require(cls, data, fields or {})
    try:
        return from_dict(cls, data)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from exc


def require(cls: type, data: Mapping[str, Any], fields: Fields) -> None:
    """``--input is required (or input: in the --config file)`` for the first required field of ``cls`` that
    ``data`` lacks and a flag of ``fields`` sets."""
    import dataclasses

    flag_of = {name: dest for dest, (section, name) in fields.items() if not section}
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in data and f.name in flag_of:
            raise _error(f"--{flag_of[f.name].replace('_', '-')} is required (or {f.name}: in the --config file)")


def add_config_arguments(p: argparse.ArgumentParser, what: str, example: str = "train.lr=1e-4") -> None:
    """``--config FILE`` and ``--set KEY=VALUE`` (every command that has a config takes both)."""
    p.add_argument("--config", help=f"YAML / JSON file with {what} fields (flags override it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"any config key, dotted ({example}); the value is parsed as YAML")
