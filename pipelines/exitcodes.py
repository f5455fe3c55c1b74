"""Exit codes of every ``clipcap`` sub-command and ``jobs/*.py`` script (documented in the README).

- ``OK`` (0): all input processed (units already done by an earlier run count as processed).
- ``USAGE`` (2): a config / schema / input problem found before any work (one line on stderr); nothing was
  written.
- ``REFUSED`` (3): nightly retraining refused to promote the candidate (the production model is unchanged).
- ``PARTIAL`` (4): stopped or failed part-way: some units (shards, parts) failed and are not committed, or the
  output could not take a unit (disk full, read-only; the unit and the cause named); a rerun retries only the
  units not committed.
- ``NOTHING`` (5): nothing was produced: every unit failed, or (download) not one sample arrived.
- ``UNHEALTHY`` (6): the output failed a health check: training hit a non-finite loss or gradient (no model
  written), or most captions of a run came out empty. Rerunning as is gives the same result.
- ``SIGINT_STOP`` (130) / ``SIGTERM_STOP`` (143): 128 + the signal: stopped by Ctrl-C / SIGTERM; one line
  ``stopped: N of M parts committed; rerun resumes`` on stderr; committed units stay, none is half-written.
"""

from __future__ import annotations

import signal

OK, USAGE, REFUSED, PARTIAL, NOTHING, UNHEALTHY = 0, 2, 3, 4, 5, 6
SIGINT_STOP, SIGTERM_STOP = 128 + signal.SIGINT, 128 + signal.SIGTERM


class JobFailed(RuntimeError):
    """A job-level failure with its exit code; the CLI prints the message as one line and exits with it."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def outcome(done: int, failed: int) -> int:
    """Exit code from the units done (this run or before) and the units that failed."""
    if failed == 0:
        return OK if done > 0 else NOTHING
    return PARTIAL if done > 0 else NOTHING


def signal_code(signum: int) -> int:
    """Exit code of a job stopped by signal ``signum`` (the shell's convention: 128 + the signal number)."""
    return 128 + int(signum)
