"""Every flag of every ``clipcap`` sub-command says what it does in ``--help`` (issue 13.6)."""

from __future__ import annotations

import argparse

from pipelines.cli import build_parser


def test_every_flag_of_every_subcommand_has_help_text():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"download", "embed", "train", "caption", "caption-images"} <= set(sub.choices)
    missing = {name: [a.option_strings or [a.dest] for a in sp._actions
                      if not a.help and not isinstance(a, argparse._HelpAction)]
               for name, sp in sub.choices.items()}
    assert {k: v for k, v in missing.items() if v} == {}
