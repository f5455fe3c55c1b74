"""The one config layer of every command: a command's flags generated from its config dataclass (adding an option
is adding a field), and a YAML / JSON ``--config`` file < flags < ``--set KEY=VALUE`` into that dataclass.

Field ``beam_size`` is ``--beam-size``, in an argument group per section; ``Literal`` gives choices, ``tuple``
several values, ``bool`` a switch; the help is the field's docstring, ``metadata["help"]`` or end-of-line comment.
``ClassVar`` ``CLI_FLAGS`` renames a flag (``-k/--top-k``; no dashes: positional) or hides a field (None);
``CLI_COMMA`` names comma-separated tuples.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib
import inspect
import json
import textwrap
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from clipcap_core.configs import ConfigError, from_dict

REQUIRED = object()  # a field without a default
MAX_CONFIG_BYTES = 1 << 20  # a config file is a few hundred bytes; anything near 1 MiB is not one
Fields = Mapping[str, tuple[str, str]]


@dataclass(frozen=True)
class Flag:
    """One flag: a leaf field of a config (``path`` dotted from the top config, ``section`` "" at the top)."""

    flag: str
    dest: str
    path: str
    section: str
    kind: type | None  # int, float, str, bool; None: no flag form
    choices: tuple[str, ...] = ()  # a Literal's values
    many: bool = False  # tuple[X, ...]
    optional: bool = False  # X | None
    default: Any = REQUIRED
    help: str = ""
    comma: bool = False


def comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def config_class(ref: str | type) -> type:
    """The class of a ``module:Class`` reference."""
    if isinstance(ref, type):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@functools.cache
def _field_help(cls: type) -> dict[str, str]:
    """Field name -> the docstring under it or the comment at the end of its line, from the class source."""
    src = textwrap.dedent(inspect.getsource(cls))
    lines, body = src.splitlines(), ast.parse(src).body[0].body  # type: ignore[attr-defined]
    out = {}
    for node, nxt in zip(body, [*body[1:], None], strict=True):
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            out[node.target.id] = nxt.value.value
            continue
        rest = lines[(node.end_lineno or node.lineno) - 1].encode()[node.end_col_offset or 0:].decode().strip()
        out[node.target.id] = rest[1:].strip() if rest.startswith("#") else ""  # ast offsets count UTF-8 bytes
    return out


def _type(tp: Any) -> dict[str, Any]:
    """kind / choices / many / optional of a field's type."""
    out: dict[str, Any] = {}
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        out["optional"], tp = True, rest[0] if len(rest) == 1 else Any
        args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis:
        out["many"], tp = True, args[0]
    if typing.get_origin(tp) is Literal:
        return {**out, "kind": str, "choices": tuple(map(str, typing.get_args(tp)))}
    return {**out, "kind": tp if tp in (int, float, str, bool) else None}


def _walk(cls: type, prefix: str, names: dict[str, str | None], comma: set[str], instance: Any) -> list[Flag]:
    """The flags of ``cls``'s leaf fields; ``instance``: a section's default instance."""
    names = {**{prefix + k: v for k, v in getattr(cls, "CLI_FLAGS", {}).items()}, **names}
    comma = comma | {prefix + k for k in getattr(cls, "CLI_COMMA", ())}
    hints, docs, out = typing.get_type_hints(cls), _field_help(cls), []
    for f in dataclasses.fields(cls):
        path, tp = prefix + f.name, hints[f.name]
        if names.get(path, "") is None:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = REQUIRED
        default = getattr(instance, f.name) if instance is not None else default
        if dataclasses.is_dataclass(tp):
            out += _walk(tp, path + ".", names, comma, default)  # type: ignore[arg-type]
            continue
        t = _type(tp)
        if t["kind"] is None and path not in comma:
            raise ValueError(f"{cls.__name__}: field {path} has no flag form; map it to None in CLI_FLAGS "
                             "(set by --config / --set only)")
        negative = t["kind"] is bool and default is True and not t.get("optional")
        flag = names.get(path) or ("--no-" if negative else "--") + f.name.replace("_", "-")
        dest = f.name if negative else flag.split("/")[-1].lstrip("-").replace("-", "_")
        text = docs.get(f.name) or f.metadata.get("help", "")
        out.append(Flag(flag, dest, path, prefix.rstrip("."), default=default, help=" ".join(text.split()),
                        comma=path in comma, **t))
    return out


@functools.cache
def flags(ref: str | type) -> tuple[Flag, ...]:
    """The flags of the config ``module:Class`` in field order (see the module docstring)."""
    out = _walk(config_class(ref), "", {}, set(), None)
    dests = [fl.dest for fl in out]
    if len(set(dests)) != len(dests):
        raise ValueError(f"{ref}: two fields give the flag --{max(dests, key=dests.count)}; rename one in CLI_FLAGS")
    return tuple(out)


def fields(ref: str | type) -> dict[str, tuple[str, str]]:
    """flag dest -> (section, field name) of every flag of ``ref``."""
    return {fl.dest: (fl.section, fl.path.rsplit(".", 1)[-1]) for fl in flags(ref)}


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _help(fl: Flag) -> str:
    text, d = fl.help, fl.default
    shown = ("," if fl.comma else " ").join(map(_show, d)) if isinstance(d, tuple) else _show(d)
    if fl.kind is not bool and d not in (REQUIRED, None, "") and not isinstance(d, dict) \
            and "default" not in text and f"{shown}:" not in text:  # "(0: sized from the cluster)" says it
        text = f"{text} (default: {shown})".lstrip()
    return text.replace("%", "%%")


def add(p: argparse.ArgumentParser, ref: str | type, *, skip: tuple[str, ...] = (), title: str | None = None,
        required: bool = False, defaults: bool = False) -> None:
    """One argument per flag of ``ref`` (but ``skip``), by section or all in group ``title``. ``required``: a field
    without a default is a required flag; ``defaults``: flags default to the fields' (else None: an absent flag
    keeps the config file's value)."""
    groups: dict[str, Any] = {"": p.add_argument_group(title) if title else p}
    for fl in flags(ref):
        if fl.dest in skip:
            continue
        section = "" if title else fl.section
        target = groups.get(section) or groups.setdefault(section, p.add_argument_group(section))
        kw: dict[str, Any] = {"dest": fl.dest, "help": _help(fl)}
        if defaults and fl.default not in (REQUIRED, None):
            kw["default"] = fl.default
        if fl.kind is bool:
            kw["action"] = argparse.BooleanOptionalAction if fl.optional else (
                "store_false" if fl.default is True else "store_true")
            kw.setdefault("default", None)
        else:
            if fl.comma or fl.kind in (int, float):
                kw["type"] = comma_list if fl.comma else fl.kind
            if fl.choices:
                kw["choices"] = list(fl.choices)
            if fl.many and not fl.comma:
                kw["nargs"] = "+"
            if required and fl.default is REQUIRED and fl.flag.startswith("-"):
                kw["required"] = True
        if not fl.flag.startswith("-"):  # a positional argument: its name is its dest
            del kw["dest"]
        target.add_argument(*fl.flag.split("/"), **kw)


# --- --config, flags and --set into the config ----------------------------------------------------------------
def load_file(path: str | None) -> dict[str, Any]:
    """A YAML (``safe_load``) or JSON config file as a dict; ``{}`` without a path."""
    if not path:
        return {}
    p, kind = Path(path), "YAML" if path.endswith((".yaml", ".yml")) else "JSON"
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist or is not a file")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = yaml.safe_load(p.read_text()) if kind == "YAML" else json.loads(p.read_text())
    except (yaml.YAMLError, ValueError) as exc:
        raise ConfigError(f"config file {path} is not valid {kind}: {exc}") from exc
    if not isinstance(data or {}, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data or {}


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else in ``over`` replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out.get(k) or {}, v) if isinstance(v, Mapping) else v
    return out


def given(args: argparse.Namespace, fields: Fields, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The flags that were given (not None), as a nested mapping."""
    data: dict[str, Any] = {}
    for dest, (section, name) in fields.items():
        if getattr(args, dest, None) is not None and dest not in skip:
            _put(data, f"{section}.{name}".lstrip("."), getattr(args, dest))
    return data


def _put(data: dict[str, Any], key: str, value: Any) -> None:
    """``data[a][b] = value`` for the key ``a.b``; under ``model_overrides`` the rest stays one dotted key."""
    *parents, last = key.split(".", 1) if key.startswith("model_overrides.") else key.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {p!r} is not a config section")
    node[last] = value


def apply_sets(data: dict[str, Any], sets: list[str] | None) -> None:
    """``--set a.b=VALUE`` (VALUE parsed as YAML) into ``data``."""
    for item in sets or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            _put(data, key, yaml.safe_load(raw))
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: the value is not valid YAML: {exc}") from exc


def collect(args: argparse.Namespace, fields: Fields, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``--config`` file < flags (then ``extra``, values a command derives from its flags) < ``--set``."""
    data = merge(merge(load_file(getattr(args, "config", None)), given(args, fields)), extra or {})
    apply_sets(data, getattr(args, "set", None))
    return data


def from_args(args: argparse.Namespace, ref: str | type, *, extra: Mapping[str, Any] | None = None) -> Any:
    """The config ``module:Class`` from ``--config``, its flags (``add(p, ref)``) and ``--set``, validated."""
    return build(config_class(ref), collect(args, fields(ref), extra), fields(ref))


def build(cls: type, data: Mapping[str, Any], flag_fields: Fields | None = None) -> Any:
    """``from_dict`` with every failure a ConfigError, a missing required field named by its flag."""
    flag_of = {name: dest for dest, (section, name) in (flag_fields or {}).items() if not section}
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in data and f.name in flag_of:
            raise ConfigError(f"--{flag_of[f.name].replace('_', '-')} is required (or {f.name}: in the --config file)")
    try:
        return from_dict(cls, data)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from exc


def add_config_arguments(p: argparse.ArgumentParser, what: str, example: str = "train.lr=1e-4") -> None:
    """``--config FILE`` and ``--set KEY=VALUE`` (every command that has a config takes both)."""
    p.add_argument("--config", help=f"YAML / JSON file with {what} fields (flags override it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"any config key, dotted ({example}); the value is parsed as YAML")
