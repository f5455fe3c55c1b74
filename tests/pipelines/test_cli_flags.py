"""The flags generated from the config dataclasses (``pipelines.commands.flags``): a field is a flag, read from the
source without importing it, and what is read is what Python builds."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import pytest

from pipelines import cli
from pipelines.commands import flags

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, kw_only=True)
class _Inner:
    level: Literal["low", "high"] = "low"
    """how high"""
    hidden: int = 3


@dataclass(frozen=True, kw_only=True)
class _Example:
    CLI_FLAGS: ClassVar[dict[str, str | None]] = {"inner.hidden": None, "count": "--how-many", "extra": None}
    CLI_COMMA: ClassVar[tuple[str, ...]] = ("names",)
    path: str
    """where it goes"""
    count: int = 2
    """how many"""
    ratio: float | None = None
    """a share"""
    paths: tuple[str, ...] = ()  # where from (a comment: the help when there is no docstring)
    names: tuple[str, ...] = ("a", "b")
    fast: bool = False
    """go fast"""
    checks: bool = True
    """check things"""
    gpu: bool | None = None
    inner: _Inner = field(default_factory=_Inner)
    extra: dict[str, int] = field(default_factory=dict)
    meta: int = field(default=7, metadata={"help": "from metadata"})


EXAMPLE = f"{__name__}:_Example"


def _parser(ref: str = EXAMPLE) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    flags.add(p, ref)
    return p


def test_a_field_is_a_flag_typed_by_its_annotation():
    p = _parser()
    ns = p.parse_args(["--path", "p", "--how-many", "4", "--ratio", "0.5", "--paths", "x", "y", "--names", "c, d",
                       "--fast", "--no-checks", "--no-gpu", "--level", "high", "--meta", "8"])
    assert vars(ns) == {"path": "p", "how_many": 4, "ratio": 0.5, "paths": ["x", "y"], "names": ["c", "d"],
                        "fast": True, "checks": False, "gpu": False, "level": "high", "meta": 8}
    assert set(vars(p.parse_args([])).values()) == {None}  # an absent flag keeps the config file's value
    with pytest.raises(SystemExit):
        p.parse_args(["--level", "medium"])  # Literal -> choices
    with pytest.raises(SystemExit):
        p.parse_args(["--hidden", "1"])  # mapped to None: --config / --set only
    assert flags.fields(EXAMPLE)["how_many"] == ("", "count") and flags.fields(EXAMPLE)["level"] == ("inner", "level")


def test_help_comes_from_the_field_docstring_metadata_or_comment_with_the_default():
    text = " ".join(_parser().format_help().split())
    assert "--paths PATHS [PATHS ...] where from (a comment: the help when there is no docstring)" in text
    assert "--how-many HOW_MANY how many (default: 2)" in text
    assert "--level {low,high} how high (default: low)" in text
    assert "--meta META from metadata (default: 7)" in text
    assert "--no-checks check things" in text


def test_a_field_without_a_flag_form_must_be_mapped_to_none():
    """A new ``dict`` field would otherwise vanish from the CLI silently (or crash argparse)."""
    with pytest.raises(ValueError, match="extra has no flag form"):
        flags.flags(f"{__name__}:_Unmapped")


@dataclass(frozen=True, kw_only=True)
class _Unmapped:
    extra: dict[str, int] = field(default_factory=dict)


def _command_configs() -> dict[str, str]:
    """Every ``module:Class`` whose fields are flags of a command (``pipelines.cli``'s constants)."""
    return {attr: ref for attr, ref in vars(cli).items()
            if attr.isupper() and isinstance(ref, str) and re.fullmatch(r"[\w.]+:[A-Z]\w*", ref)}


def _imported(cls: type, prefix: str = "", instance: object = None) -> dict[str, tuple]:
    """path -> (kind, choices, many, optional, default) of every leaf field, from the class Python builds
    (``instance``: a section's default instance, whose values are the defaults)."""
    out: dict[str, tuple] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, many, optional = hints[f.name], False, False
        default = getattr(instance, f.name) if instance is not None else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)  # type: ignore[misc]
        if dataclasses.is_dataclass(tp):
            out.update(_imported(tp, f"{prefix}{f.name}.", default))
            continue
        args = typing.get_args(tp)
        if type(None) in args:
            optional, rest = True, [a for a in args if a is not type(None)]
            tp = rest[0] if len(rest) == 1 else tp
        if typing.get_origin(tp) is tuple and len(typing.get_args(tp)) == 2 and typing.get_args(tp)[1] is Ellipsis:
            many, tp = True, typing.get_args(tp)[0]
        if typing.get_origin(tp) is Literal:
            kind, choices = "str", tuple(map(str, typing.get_args(tp)))
        else:
            kind, choices = (tp.__name__ if tp in (int, float, str, bool) else "other"), ()
        out[prefix + f.name] = ("other",) if kind == "other" or dataclasses.is_dataclass(tp) \
            else (kind, choices, many, optional, default)
    return out


def test_the_fields_read_from_the_source_are_the_imported_classes():
    """The reader (``ast``) against Python's own view of every command's config: a field it misreads (a type
    alias, an import it cannot follow, a section) fails here."""
    configs = _command_configs()
    assert {"CAPTION", "CAPTION_IMAGES", "PRESET"} <= set(configs)
    for ref in configs.values():
        module, _, name = ref.partition(":")
        cls = getattr(importlib.import_module(module), name)
        real = _imported(cls)
        read = {f.path: ("other",) if f.kind == "other" else (f.kind, f.choices, f.many, f.optional, f.default)
                for f in flags.read(ref)}
        for path, value in read.items():  # a default written as an expression (64 << 20) is not shown in help
            if isinstance(value[-1], flags.Expr):
                read[path] = (*value[:-1], real[path][-1])
            elif value[-1] is flags.REQUIRED:
                read[path] = (*value[:-1], dataclasses.MISSING)
        assert read == real, ref


@pytest.mark.parametrize("command", ["caption", "train", "train-clip", "report"])
def test_help_of_a_command_whose_config_module_imports_torch_imports_no_torch(command):
    """The flags are read from the configs' source: importing the config for ``--help`` (or a bad flag's exit 2)
    would import torch, seconds of every call on a busy 2-core node."""
    code = (f"import sys\nfrom pipelines.cli import main\ntry:\n    main([{command!r}, '--help'])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.splitlines()[-1] == "False False", out.stdout[-500:]
