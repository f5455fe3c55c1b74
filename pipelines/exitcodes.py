"""Exit codes of every ``clipcap`` sub-command and ``jobs/*.py`` script (documented in the README).

- ``OK`` (0): all input processed (units already done by an earlier run count as processed).
- ``USAGE`` (2): a config / schema / input problem found before any work (one line on stderr); nothing was
  written.
- ``REFUSED`` (3): nightly retraining refused to promote the candidate (the production model is unchanged).
- ``PARTIAL`` (4): stopped or failed part-way: some units (shards, parts) failed and are not committed, or the
  output could not take a unit (disk full, read-only; the unit and the cause named); a rerun retries only the
  units not committed.
- ``NOTHING`` (5): nothing was produced: every unit failed, or (download) not one sample arrived.
- ``SIGINT_STOP`` (130) / ``SIGTERM_STOP`` (143): 128 + the signal: stopped by Ctrl-C / SIGTERM; one line
  ``stopped: N of M parts committed; rerun resumes`` on stderr; committed units stay, none is half-written.
"""

from __future__ import annotations

import signal

OK, USAGE, REFUSED, PARTIAL, NOTHING = 0, 2, 3, 4, 5
SIGINT_STOP, SIGTERM_STOP = 128 + signal.SIGINT, 128 + signal.SIGTERM


def outcome(done: int, failed: int) -> int:
    """Exit code from the units done (this run or before) and the units that failed."""
    if failed == 0:
        return OK if done > 0 else NOTHING
    return PARTIAL if done > 0 else NOTHING


def signal_code(signum: int) -> int:
    """Exit code of a job stopped by signal ``signum`` (the shell's convention: 128 + the signal number)."""
    return 128 + int(signum)
