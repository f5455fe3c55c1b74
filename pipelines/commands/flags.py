"""The one config layer of every command: a command's flags generated from its config dataclass (adding an option
is adding a field), and a YAML / JSON ``--config`` file < flags < ``--set KEY=VALUE`` into that dataclass
(``clipcap_core.configs.from_dict``: unknown keys and wrong types fail, naming the key).

Field ``beam_size`` is ``--beam-size``; a section's fields go in an argument group named after the section. The
type gives parsing (``Literal`` -> choices, ``tuple`` -> several values, ``bool`` -> a switch); the help is the
field's docstring, ``metadata["help"]`` or its end-of-line comment. ``ClassVar`` ``CLI_FLAGS`` renames a flag
(``-k/--top-k``: two spellings; no dashes: a positional argument) or hides a field (None), ``CLI_COMMA`` names
comma-separated tuples. The classes are read from source (``ast``): their modules import torch, and field
docstrings exist only in the source.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib
import importlib.util
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from clipcap_core.configs import ConfigError, from_dict

REQUIRED = object()  # a field without a default
_PRIMITIVE = {"int": int, "float": float, "str": None, "bool": None}
MAX_CONFIG_BYTES = 1 << 20  # a config file is a few hundred bytes; anything near 1 MiB is not one
Fields = Mapping[str, tuple[str, str]]


@dataclass(frozen=True)
class Field:
    """One leaf field of a config as read from its source."""

    path: str                        # dotted from the top config: "decoding.n"
    kind: str                        # int, float, str, bool, or "other" (no flag form)
    choices: tuple[str, ...] = ()    # a Literal's values
    many: bool = False               # tuple[X, ...]
    optional: bool = False           # X | None
    default: Any = REQUIRED
    help: str = ""


@dataclass(frozen=True)
class Flag:
    flag: str
    dest: str
    field: Field
    section: str                     # "" for a top-level field
    comma: bool = False


def comma_list(text: str) -> list[str]:
    """``a, b,c`` -> ``["a", "b", "c"]`` (the type of a ``CLI_COMMA`` field's flag)."""
    return [part.strip() for part in text.split(",") if part.strip()]


# --- reading the dataclasses from their source ------------------------------------------------------------------
@functools.cache
def _module(name: str) -> ast.Module:
    return ast.parse(_source(name))


@functools.cache
def _source(name: str) -> str:
    top, _, rest = name.partition(".")
    spec = importlib.util.find_spec(top)  # the top package only: no sub-package __init__ runs
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"config module {name}: package {top} not found")
    base = Path(next(iter(spec.submodule_search_locations))).joinpath(*rest.split(".")) if rest else None
    path = next((p for p in ((base.with_suffix(".py"), base / "__init__.py") if base else ()) if p.is_file()),
                Path(spec.origin or ""))
    return path.read_text()


def _lookup(module: str, name: str) -> tuple[str, ast.AST | None] | None:
    """(module, definition) of the module-level class or assignment ``name`` of ``module``, following
    ``from X import name``; (the module's name, None) where ``name`` is a module."""
    for node in _module(module).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return module, node
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return module, node.value
        if isinstance(node, ast.ImportFrom) and not node.level:
            for alias in node.names:
                if (alias.asname or alias.name) == name:  # a name from a module, or a module from a package
                    return _lookup(node.module or "", alias.name) or (f"{node.module}.{alias.name}", None)
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return alias.name, None
    return None


def _is_dataclass(node: ast.AST | None) -> bool:
    return isinstance(node, ast.ClassDef) and any(
        "dataclass" in ast.unparse(d.func if isinstance(d, ast.Call) else d) for d in node.decorator_list)


def _resolve(module: str, node: ast.expr) -> tuple[str, ast.AST | None] | None:
    """A ``Name`` / ``module.Name`` annotation to its definition."""
    if isinstance(node, ast.Name):
        return _lookup(module, node.id)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        found = _lookup(module, node.value.id)
        if found and found[1] is None:
            return _lookup(found[0], node.attr)
    return None


def _type(module: str, node: ast.expr) -> dict[str, Any]:
    """kind / choices / many / optional of an annotation, or ``section=(module, ClassDef)`` for a dataclass."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return _type(module, ast.parse(node.value, mode="eval").body)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        members = [m for m in (node.left, node.right) if not (isinstance(m, ast.Constant) and m.value is None)]
        out = _type(module, members[0]) if len(members) == 1 else {"kind": "other"}
        return {**out, "optional": True} if "section" not in out else {"kind": "other"}
    if isinstance(node, ast.Subscript):
        base, arg = ast.unparse(node.value).split(".")[-1], node.slice
        elts = arg.elts if isinstance(arg, ast.Tuple) else [arg]
        if base == "Literal":
            return {"kind": "str", "choices": tuple(str(ast.literal_eval(e)) for e in elts)}
        if base == "Optional":
            out = _type(module, elts[0])
            return {**out, "optional": True} if "section" not in out else {"kind": "other"}
        if base == "tuple" and len(elts) == 2 and isinstance(elts[1], ast.Constant) and elts[1].value is Ellipsis:
            return {**_type(module, elts[0]), "many": True}
        return {"kind": "other"}
    if isinstance(node, ast.Name) and node.id in _PRIMITIVE:
        return {"kind": node.id}
    found = _resolve(module, node)
    if found and isinstance(found[1], ast.ClassDef) and _is_dataclass(found[1]):
        return {"section": found}
    if found and isinstance(found[1], ast.expr):  # an alias: Format = Literal[...]
        return _type(found[0], found[1])
    return {"kind": "other"}


def _default_and_help(value: ast.expr | None) -> tuple[Any, str]:
    if value is None:
        return REQUIRED, ""
    if isinstance(value, ast.Call) and ast.unparse(value.func).split(".")[-1] == "field":
        kw = {k.arg: k.value for k in value.keywords}
        meta = ast.literal_eval(kw["metadata"]) if "metadata" in kw else {}
        default = _literal(kw["default"]) if "default" in kw else (
            Expr("<factory>") if "default_factory" in kw else REQUIRED)
        return default, meta.get("help", "")
    return _literal(value), ""


class Expr(str):
    """A default that is an expression (``imaging.DEFAULT_MAX_PIXELS``, ``64 << 20``), as written."""


def _literal(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return Expr(ast.unparse(node))


def _comment(module: str, node: ast.stmt) -> str:
    """The ``# ...`` comment at the end of ``node``'s last line ("" if none)."""
    line = _source(module).splitlines()[(node.end_lineno or node.lineno) - 1].encode()
    rest = line[node.end_col_offset or 0:].decode().strip()  # ast offsets count UTF-8 bytes
    return rest[1:].strip() if rest.startswith("#") else ""


def _class_vars(cls: ast.ClassDef) -> dict[str, Any]:
    out = {}
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None \
                and "ClassVar" in ast.unparse(node.annotation):
            out[node.target.id] = ast.literal_eval(node.value)
    return out


def _section_defaults(value: ast.expr | None) -> dict[str, Any]:
    """The field values a section's default instance sets: ``EmbedResources(batch_size=256)`` (also as
    ``field(default=...)`` or ``field(default_factory=lambda: ...)``)."""
    if isinstance(value, ast.Call) and ast.unparse(value.func).split(".")[-1] == "field":
        kw = {k.arg: k.value for k in value.keywords}
        value = kw.get("default") or getattr(kw.get("default_factory"), "body", None)
    if not isinstance(value, ast.Call):
        return {}
    return {k.arg: _literal(k.value) for k in value.keywords if k.arg}


def _walk(module: str, cls: ast.ClassDef, prefix: str, names: dict[str, str | None], comma: set[str],
          every: bool, given: dict[str, Any]) -> list[tuple[Field, str | None, bool]]:
    """(field, its CLI_FLAGS name, comma) per leaf field; ``every``: the fields mapped to None too; ``given``:
    defaults the containing field's default instance sets."""
    own = _class_vars(cls)
    names = {**{prefix + k: v for k, v in own.get("CLI_FLAGS", {}).items()}, **names}
    comma = comma | {prefix + k for k in own.get("CLI_COMMA", ())}
    out: list[tuple[Field, str | None, bool]] = []
    body = cls.body
    for i, node in enumerate(body):
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name) \
                or "ClassVar" in ast.unparse(node.annotation):
            continue
        path = prefix + node.target.id
        if path in names and names[path] is None and not every:
            continue
        tp = _type(module, node.annotation)
        if "section" in tp:
            out += _walk(*tp["section"], path + ".", names, comma, every, _section_defaults(node.value))
            continue
        default, help_text = _default_and_help(node.value)
        default = given.get(node.target.id, default)
        nxt = body[i + 1] if i + 1 < len(body) else None
        if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            help_text = nxt.value.value
        help_text = help_text or _comment(module, node)
        f = Field(path=path, default=default, help=" ".join(help_text.split()), **tp)
        out.append((f, names.get(path), path in comma))
    return out


@functools.cache
def read(ref: str) -> tuple[Field, ...]:
    """Every leaf field of the config ``module:Class`` (sections flattened, dotted paths), as in its source."""
    return tuple(f for f, _, _ in _walk_ref(ref, every=True))


def _walk_ref(ref: str, every: bool = False) -> list[tuple[Field, str | None, bool]]:
    module, _, name = ref.partition(":")
    found = _lookup(module, name)
    if not found or not isinstance(found[1], ast.ClassDef) or not _is_dataclass(found[1]):
        raise ValueError(f"{ref}: no dataclass {name} in {module}")
    return _walk(found[0], found[1], "", {}, set(), every, {})


# --- the flags ---------------------------------------------------------------------------------------------------
@functools.cache
def flags(ref: str) -> tuple[Flag, ...]:
    """The flags of the config ``module:Class`` in field order (see the module docstring)."""
    out: list[Flag] = []
    for f, name, comma in _walk_ref(ref):
        *sections, last = f.path.split(".")
        if f.kind == "other" and not comma:
            raise ValueError(f"{ref}: field {f.path} has no flag form; map it to None in CLI_FLAGS "
                             "(set by --config / --set only)")
        negative = f.kind == "bool" and f.default is True and not f.optional
        flag = name or ("--no-" if negative else "--") + last.replace("_", "-")
        dest = last if negative else flag.split("/")[-1].lstrip("-").replace("-", "_")
        out.append(Flag(flag, dest, f, ".".join(sections), comma))
    dests = [fl.dest for fl in out]
    if len(set(dests)) != len(dests):
        raise ValueError(f"{ref}: two fields give the flag --{max(dests, key=dests.count)}; rename one in CLI_FLAGS")
    return tuple(out)


def fields(ref: str) -> dict[str, tuple[str, str]]:
    """flag dest -> (section, field name) of every flag of ``ref`` (``options.collect`` / ``options.build``)."""
    return {fl.dest: (fl.section, fl.field.path.rsplit(".", 1)[-1]) for fl in flags(ref)}


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _help(f: Field, comma: bool = False) -> str:
    text = f.help
    shown = ("," if comma else " ").join(map(_show, f.default)) if isinstance(f.default, tuple) else _show(f.default)
    if f.kind != "bool" and f.default not in (REQUIRED, None, "") and not isinstance(f.default, Expr) \
            and "default" not in text and f"{shown}:" not in text:  # "(0: sized from the cluster)" says it
        text = f"{text} (default: {shown})".lstrip()
    return text.replace("%", "%%")


def add(p: argparse.ArgumentParser, ref: str, *, skip: tuple[str, ...] = (), title: str | None = None,
        required: bool = False, defaults: bool = False) -> None:
    """One argument per flag of ``ref`` (but the dests in ``skip``); a section's flags in its argument group, or
    every flag in one group ``title`` (a parser that takes the flags of several configs). ``required``: a field
    without a default is a required flag (a command without ``--config``, where nothing else can give it);
    ``defaults``: a flag's default is its field's (else None: an absent flag keeps the config file's value)."""
    groups: dict[str, Any] = {"": p.add_argument_group(title) if title else p}
    for fl in flags(ref):
        if fl.dest in skip:
            continue
        section = "" if title else fl.section
        f, target = fl.field, groups.get(section) or groups.setdefault(section, p.add_argument_group(section))
        kw: dict[str, Any] = {"dest": fl.dest, "help": _help(f, fl.comma)}
        if defaults and f.default not in (REQUIRED, None):
            kw["default"] = f.default
        if f.kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction if f.optional else (
                "store_false" if f.default is True else "store_true")
            kw.setdefault("default", None)
        else:
            if fl.comma:
                kw["type"] = comma_list
            elif _PRIMITIVE[f.kind]:
                kw["type"] = _PRIMITIVE[f.kind]
            if f.choices:
                kw["choices"] = list(f.choices)
            if f.many and not fl.comma:
                kw["nargs"] = "+"
            if required and f.default is REQUIRED and fl.flag.startswith("-"):
                kw["required"] = True
        if not fl.flag.startswith("-"):  # a positional argument: its name is its dest
            del kw["dest"]
        target.add_argument(*fl.flag.split("/"), **kw)


# --- --config, flags and --set into the config ----------------------------------------------------------------
def load_file(path: str | None) -> dict[str, Any]:
    """A YAML (``.yaml`` / ``.yml``, ``safe_load``) or JSON config file as a dict; ``{}`` without a path."""
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
    """``data[a][b] = value`` for the key ``a.b``; under ``model_overrides`` the rest of the key stays one dotted
    key (``model_overrides.mapping.clip_length``: a ModelConfig key)."""
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


def collect(args: argparse.Namespace, fields: Fields, *, base: Mapping[str, Any] | None = None,
            extra: Mapping[str, Any] | None = None, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """``base`` < ``--config`` file < flags (then ``extra``, values a command derives from its flags) <
    ``--set``, as one nested mapping."""
    data = merge(base or {}, load_file(getattr(args, "config", None)))
    data = merge(merge(data, given(args, fields, skip=skip)), extra or {})
    apply_sets(data, getattr(args, "set", None))
    return data


def from_args(args: argparse.Namespace, ref: str, *, extra: Mapping[str, Any] | None = None) -> Any:
    """The config ``module:Class`` from ``--config``, its flags (``add(p, ref)``) and ``--set``, validated."""
    module, _, name = ref.partition(":")
    return build(getattr(importlib.import_module(module), name), collect(args, fields(ref), extra=extra), fields(ref))


def build(cls: type, data: Mapping[str, Any], flag_fields: Fields | None = None) -> Any:
    """``from_dict`` with every failure a ConfigError (a dataclass ``__post_init__`` may raise ValueError /
    TypeError): the CLI turns it into one line and exit code 2, before any work. A required top-level field
    that is missing is named by its flag in ``flag_fields``."""
    require(cls, data, flag_fields or {})
    try:
        return from_dict(cls, data)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from exc


def require(cls: type, data: Mapping[str, Any], flag_fields: Fields) -> None:
    """``--input is required (or input: in the --config file)`` for the first required field of ``cls`` that
    ``data`` lacks and a flag of ``flag_fields`` sets."""
    flag_of = {name: dest for dest, (section, name) in flag_fields.items() if not section}
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in data and f.name in flag_of:
            raise ConfigError(f"--{flag_of[f.name].replace('_', '-')} is required (or {f.name}: in the --config file)")


def add_config_arguments(p: argparse.ArgumentParser, what: str, example: str = "train.lr=1e-4") -> None:
    """``--config FILE`` and ``--set KEY=VALUE`` (every command that has a config takes both)."""
    p.add_argument("--config", help=f"YAML / JSON file with {what} fields (flags override it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"any config key, dotted ({example}); the value is parsed as YAML")
