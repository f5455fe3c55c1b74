"""What the ``clipcap`` sub-commands share besides their config layer (``options``) and the flags generated
from their configs (``flags``): ``--ray-address``, connecting to Ray, and printing a result
with the units that were not done.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import Any

RAY_ADDRESS_HELP = "Ray cluster address (default: RAY_ADDRESS or a local instance)"
# embed / embed-text look for a running local head before they start one (runtime.ensure_ray)
RAY_ADDRESS_HEAD_HELP = "Ray cluster address (default: RAY_ADDRESS, a running local head, else a new local instance)"


def require(args: argparse.Namespace, *dests: str) -> None:
    """A ValueError naming the first missing flag of ``dests`` (``main`` prints it as one line, exit code 2)."""
    for dest in dests:
        if getattr(args, dest, None) in (None, ""):
            raise ValueError(f"--{dest.replace('_', '-')} is required")


def add_ray_address(p: argparse.ArgumentParser, help_text: str = RAY_ADDRESS_HELP) -> None:
    p.add_argument("--ray-address", help=help_text)


def init_ray(address: str | None) -> None:
    """Connect to an explicit ``--ray-address``. Without one, Ray starts when the job first needs it (after
    inputs and model were checked): it connects to RAY_ADDRESS (``ray job submit``) or starts a local instance."""
    from pipelines import runtime

    if address:
        runtime.ensure_ray(address)


def print_result(text: str | None, data: Mapping[str, Any] | str) -> None:
    """A stage's summary, once: on a terminal its one-line description (or the scalar fields, wrapped), else
    the description then the summary as indented JSON (or JSON already rendered) for scripts."""
    if sys.stdout.isatty() and not isinstance(data, str):
        print(text if text is not None else brief(data))
        return
    if text is not None:
        print(text)
    print(data if isinstance(data, str) else json.dumps(data, indent=2))


def brief(data: Mapping[str, Any], width: int = 100) -> str:
    """The non-empty scalar fields of ``data`` as ``key: value`` pairs, wrapped to ``width`` columns."""
    import textwrap

    pairs = [f"{k}: {round(v, 2) if isinstance(v, float) else v}" for k, v in data.items()
             if isinstance(v, (str, int, float)) and not isinstance(v, bool) and v not in ("", 0)]
    return textwrap.fill(", ".join(pairs), width=width, subsequent_indent="  ")


def print_not_done(failed: Mapping[str, str], line: str) -> None:
    """One line per unit not done on the operator's terminal, sorted by name; ``line`` is formatted with
    ``name`` and ``why``."""
    from pipelines.console import terminal

    for name, why in sorted(failed.items()):
        print(line.format(name=name, why=why), file=terminal())
