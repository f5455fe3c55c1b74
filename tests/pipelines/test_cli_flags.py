"""The flags generated from the config dataclasses (``pipelines.commands.flags``): a field is a flag, typed by its
annotation, with its docstring, metadata or comment as help."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pytest

from pipelines.commands import flags


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
