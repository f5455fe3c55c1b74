"""The ``clipcap`` console script: one sub-command per stage.

Each sub-command module named in ``COMMANDS`` has ``HELP`` (its line in ``clipcap --help``), a docstring (its
``--help`` description), ``add_arguments(parser)`` and ``run(args) -> int``, which does the work by calling one
library function, and optionally ``STOP_ON_SIGNALS = True`` (see below); ``build_parser`` registers them all the
same way.
Heavy imports (torch, ray, open_clip) happen inside ``run``, and ``clipcap COMMAND ...`` imports only that
command's module (some pull in torch for their config types), so a job's driver does not pay for the others.
A command runs under ``stopping.run``: an output that fails part-way, and in a command with
``STOP_ON_SIGNALS`` SIGTERM / Ctrl-C, end it with one line on stderr and their exit code (``pipelines.exitcodes``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pipelines import exitcodes, stopping

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
    "caption": "pipelines.commands.caption",
    "train-clip": "pipelines.commands.train_clip",
    "eval-clip": "pipelines.commands.eval_clip",
    "evaluate": "pipelines.commands.evaluate",
    "report": "pipelines.commands.report",
    "index": "pipelines.commands.index",
    "search": "pipelines.commands.search",
}


def build_parser(commands: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of ``commands`` only (the others are then not imported)."""
    parser = argparse.ArgumentParser(prog="clipcap", description="CLIP-prefix image captioning at scale on Ray.",
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
        mod.add_arguments(p)
        p.set_defaults(func=mod.run, stop_on_signals=getattr(mod, "STOP_ON_SIGNALS", False))
    return parser


def command_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one sub-command (``jobs/*.py``, the Ray job entry points, take the same flags)."""
    sub = next(a for a in build_parser([command])._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser([first] if first in COMMANDS else None)
    args = parser.parse_args(argv)
    from pipelines.io.urlsafety import setup_logging

    setup_logging(args.verbose)  # -v: our loggers only; URLs redacted in every record
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from pipelines.exitcodes import JobFailed

    try:
        return stopping.run(lambda: int(args.func(args) or 0), f"clipcap {args.command}",
                            signals=args.stop_on_signals)
    except JobFailed as exc:
        print(f"clipcap {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except (ValueError, OSError, FileNotFoundError) as exc:
        # Config / schema / URI problems: one clear line, no traceback (use -v for it).
        if args.verbose:
            raise
        print(f"clipcap {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
