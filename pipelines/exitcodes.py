"""Exit codes of every ``clipcap`` sub-command and ``jobs/*.py`` script (documented in the README).

- ``OK`` (0): all input processed (units already done by an earlier run count as processed).
- ``USAGE`` (2): a config / schema / input problem found before any work (one line on stderr).
- ``REFUSED`` (3): nightly retraining refused to promote the candidate (the production model is unchanged).
- ``PARTIAL`` (4): some units (shards, parts) failed and are not committed; a rerun retries only them.
- ``NOTHING`` (5): nothing was produced: every unit failed, or (download) not one sample arrived.
- ``UNHEALTHY`` (6): the output failed a health check: training hit a non-finite loss or gradient (no model
  written), or most captions of a run came out empty. Rerunning as is gives the same result.
"""

from __future__ import annotations

OK, USAGE, REFUSED, PARTIAL, NOTHING, UNHEALTHY = 0, 2, 3, 4, 5, 6


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
