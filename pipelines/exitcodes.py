"""Exit codes of every ``clipcap`` sub-command (``python -m pipelines.cli``) and ``jobs/embed_cc3m.py``."""

from __future__ import annotations

import re
import signal
import textwrap
from dataclasses import dataclass

OK, USAGE, REFUSED, PARTIAL, NOTHING, UNHEALTHY = 0, 2, 3, 4, 5, 6
SIGINT_STOP, SIGTERM_STOP = 128 + signal.SIGINT, 128 + signal.SIGTERM


@dataclass(frozen=True)
class Code:
    """One exit code: its meaning and what to do (Markdown: backticks and bold render in the README)."""

    code: int
    meaning: str
    action: str


CODES: tuple[Code, ...] = (
    Code(OK, "all done: every unit processed (units done by an earlier run count)", "nothing"),
    Code(USAGE, "refused before any work: a config, input, output or model problem, or another run holds the "
         "output's lease (`_meta/lease.json`: one line on stderr naming it and its owner); nothing was written",
         "fix what it names (another run: wait for it, or `--force-unlock` if it is dead)"),
    Code(REFUSED, "`nightly`: the candidate was not promoted (production unchanged)", "see `history/<run>.json`"),
    Code(PARTIAL, "stopped or failed part-way: some units (download shards, embedding shards, caption parts) "
         "failed and are **not** committed (stderr names them), or the output could not take a unit (disk full, "
         "read-only, its lease taken by another run: stderr names the unit, the cause and how many units are "
         "committed)", "fix the cause if named, rerun the same command: only the units not committed are redone"),
    Code(NOTHING, "nothing was produced: every unit failed, or not one sample downloaded (all dead links, server "
         "down)", "check the input / the servers, rerun"),
    Code(UNHEALTHY, "the output failed a health check: `train` hit a non-finite loss or gradient (stopped at that "
         "step, no model written), or most captions of a `caption` run came out empty",
         "fix the data or the recipe it names; a plain rerun gives the same result"),
    Code(SIGINT_STOP, "`caption`, `embed`, `embed-text` stopped by Ctrl-C (SIGINT): one line "
         "`stopped: 7 of 32 parts committed; rerun resumes`", "rerun the same command"),
    Code(SIGTERM_STOP, "the same, stopped by SIGTERM (`kill`, a scheduler's stop)", "rerun the same command"),
)


def markdown_table() -> str:
    """The README's table."""
    rows = [f"| {c.code} | {c.meaning} | {c.action} |" for c in CODES]
    return "\n".join(["| code | meaning | what to do |", "|---|---|---|", *rows])


def help_table(width: int = 88) -> str:
    """The table as plain text for ``clipcap --help`` (its epilog)."""
    lines = ["exit codes:"]
    for c in CODES:
        text = re.sub(r"[`*]", "", f"{c.meaning}. To do: {c.action}.")
        lines += textwrap.wrap(text, width, initial_indent=f"  {c.code:<5}", subsequent_indent=" " * 7)
    return "\n".join(lines + ["  1    an uncaught crash (a traceback); committed units stay committed"])


class JobFailed(RuntimeError):
    """A job-level failure with its exit code; the CLI prints the message as one line and exits with it."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def outcome(done: int, failed: int) -> int:
    """Exit code from the units done (this run or before) and the units that failed."""
    if done == 0:
        return NOTHING
    return PARTIAL if failed else OK


def signal_code(signum: int) -> int:
    """Exit code of a job stopped by signal ``signum`` (the shell's convention: 128 + the signal number)."""
    return 128 + int(signum)
