"""The ``clipcap`` console script: one sub-command per stage; ``python -m pipelines.cli CMD ...`` is the same
command for ``ray job submit``.

A sub-command module has ``HELP``, a docstring (its ``--help``), ``add_arguments(parser)`` and ``run(args) -> int``;
optional ``STOP_ON_SIGNALS`` (SIGTERM / Ctrl-C stop it cleanly) and ``JOB_LOG`` (Ray's output goes to a log file).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from pipelines import exitcodes, stopping
from pipelines.exitcodes import JobFailed
from pipelines.io.urlsafety import setup_logging

# sub-command name -> module under pipelines.commands (HELP, add_arguments, run)
COMMANDS = {
    "download": "pipelines.commands.download",
    "embed": "pipelines.commands.embed",
    "embed-text": "pipelines.commands.embed_text",
    "demo": "pipelines.commands.demo",
    "caption-images": "pipelines.commands.caption_images",
    "import-reference": "pipelines.commands.import_reference",
    "train": "pipelines.commands.train",
    "nightly": "pipelines.commands.nightly",
    "sweep": "pipelines.commands.sweep",
    "study": "pipelines.commands.study",
    "caption": "pipelines.commands.caption",
    "train-clip": "pipelines.commands.train_clip",
    "eval-clip": "pipelines.commands.eval_clip",
    "evaluate": "pipelines.commands.evaluate",
    "report": "pipelines.commands.report",
    "index": "pipelines.commands.index",
    "search": "pipelines.commands.search",
}


class Parser(argparse.ArgumentParser):
    """argparse without abbreviated flags (``--out`` is not ``--output-root``), and an unknown flag answered with
    the closest flags of the command it was given to."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self._chosen(ns)
            parser.error(unknown_message(extras, [*_flags(parser), *_flags(self)]))
        return ns

    def error(self, message: str) -> NoReturn:
        """One line naming the problem and where the flags are listed (not the whole usage)."""
        self.exit(2, f"{self.prog}: error: {message}\n{self.prog} --help lists every flag\n")

    def _chosen(self, ns: argparse.Namespace) -> argparse.ArgumentParser:
        """The sub-command's parser when one was named (the flag was meant for it), else this one."""
        sub = next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)
        return sub.choices.get(getattr(ns, "command", None) or "", self) if sub else self


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    return [flag for a in parser._actions for flag in a.option_strings]


def unknown_message(extras: list[str], known: list[str]) -> str:
    """``unrecognized arguments: --outptu (did you mean --output?)``."""
    hints = []
    for arg in extras:
        close = difflib.get_close_matches(arg.split("=", 1)[0], known, n=2) if arg.startswith("--") else []
        hints.append(f"{arg} (did you mean {' or '.join(dict.fromkeys(close))}?)" if close else arg)
    return "unrecognized arguments: " + " ".join(hints)


def build_parser(commands: list[str] | None = None, *, flags: bool = True) -> argparse.ArgumentParser:
    """The parser of every command, or of ``commands`` only (the others are then not imported); ``flags=False``
    registers the commands without their flags (``clipcap --help`` lists them without building each one)."""
    parser = Parser(prog="clipcap", description="CLIP-prefix image captioning at scale on Ray.",
                    epilog=exitcodes.help_table(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging of the project's modules "
                        "(not of boto / urllib3 / Ray, which would log credentials) and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        if commands is not None and name not in commands:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:  # stage not built yet
                continue
            raise
        p = sub.add_parser(name, help=mod.HELP, description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if flags:
            mod.add_arguments(p)
        p.set_defaults(func=mod.run, stop_on_signals=getattr(mod, "STOP_ON_SIGNALS", False),
                       job_log=getattr(mod, "JOB_LOG", False))
    return parser


def command_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one sub-command, flags included, as ``clipcap CMD`` builds it."""
    sub = next(a for a in build_parser([command])._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser([first]) if first in COMMANDS else build_parser(flags=False)
    args = parser.parse_args(argv)

    setup_logging(args.verbose)  # -v: our loggers only; URLs redacted in every record
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.verbose or not args.job_log:
        return _run(args)
    # lazy: pipelines.console imports tqdm, ~0.15-0.3 s (python -X importtime) that `clipcap CMD --help` skips
    from pipelines import console

    with console.job_log(args.command):  # Ray's own output to the log file; ours stays on the terminal
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """The command under ``stopping.run``; a job-level failure becomes one line on the terminal and its code."""
    from pipelines.console import terminal  # lazy: tqdm, see main

    try:
        return stopping.run(lambda: int(args.func(args) or 0), f"clipcap {args.command}",
                            signals=args.stop_on_signals)
    except JobFailed as exc:
        print(f"clipcap {args.command}: {exc}", file=terminal())
        return exc.exit_code
    except (ValueError, OSError, FileNotFoundError) as exc:
        # Config / schema / URI problems: one clear line, no traceback (use -v for it).
        if args.verbose:
            raise
        print(f"clipcap {args.command}: error: {exc}", file=terminal())
        return 2

if __name__ == "__main__":
    sys.exit(main())
