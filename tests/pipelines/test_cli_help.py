"""Every flag of every ``clipcap`` sub-command says what it does in ``--help``, and none disappears or changes
its destination, default, type, choices or arity against the snapshot ``cli_flags.json`` (a deliberate change
updates the file in the same commit; a new flag, i.e. a new config field, needs no change here)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipelines.cli import build_parser

SNAPSHOT = Path(__file__).with_name("cli_flags.json")


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _signature(a: argparse.Action) -> str:
    parts = [f"dest={a.dest}", type(a).__name__.strip("_").replace("Action", "").lower()]
    if a.default not in (None, argparse.SUPPRESS):
        parts.append(f"default={a.default!r}")
    if a.type is not None:
        parts.append(f"type={getattr(a.type, '__name__', 'callable')}")
    if a.choices:
        parts.append("choices=" + ",".join(map(str, a.choices)))
    if a.nargs is not None:
        parts.append(f"nargs={a.nargs}")
    if a.required:
        parts.append("required")
    return " ".join(parts)


def test_every_flag_of_every_subcommand_has_help_text():
    sub = _subcommands()
    assert {"download", "embed", "train", "caption", "caption-images"} <= set(sub)
    missing = {name: [a.option_strings or [a.dest] for a in sp._actions
                      if not a.help and not isinstance(a, argparse._HelpAction)]
               for name, sp in sub.items()}
    assert {k: v for k, v in missing.items() if v} == {}


def test_every_help_page_renders():
    assert "COMMAND" in build_parser(flags=False).format_help()
    for name, sp in _subcommands().items():
        assert sp.format_help().startswith(f"usage: clipcap {name}"), name


def test_every_command_keeps_every_flag_as_it_was():
    now = {name: {"/".join(a.option_strings) or a.dest: _signature(a) for a in sp._actions
                  if not isinstance(a, argparse._HelpAction)}
           for name, sp in _subcommands().items()}
    was = json.loads(SNAPSHOT.read_text())
    changed = {name: {flag: (sig, now.get(name, {}).get(flag)) for flag, sig in old.items()
                      if now.get(name, {}).get(flag) != sig}
               for name, old in was.items()}
    assert {name: c for name, c in changed.items() if c} == {}


def _exit_codes() -> dict[str, int]:
    from pipelines import exitcodes

    return {k: v for k, v in vars(exitcodes).items() if k.isupper() and isinstance(v, int)}


def test_clipcap_help_lists_every_exit_code():
    text = build_parser([]).format_help()
    listed = {int(line.split()[0]) for line in text.split("exit codes:", 1)[-1].splitlines() if line[:3].strip()}
    assert set(_exit_codes().values()) <= listed, (sorted(_exit_codes().values()), text)


def test_the_readme_exit_code_table_is_the_one_in_exitcodes():
    from pipelines.exitcodes import CODES, markdown_table

    assert {c.code for c in CODES} == set(_exit_codes().values())
    assert markdown_table() in (Path(__file__).resolve().parents[2] / "README.md").read_text()
