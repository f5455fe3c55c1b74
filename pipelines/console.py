"""What an operator sees of a long job: our progress line and summary on the terminal, everything else in a log."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from pipelines.io.urlsafety import PROJECT_LOGGERS

_terminal: TextIO | None = None  # the operator's stream while a job log is open


def terminal() -> TextIO:
    """Where operator-facing lines go: the saved stderr while ``job_log`` holds fd 2, else ``sys.stderr``."""
    return _terminal or sys.stderr


def _owns_fd2() -> bool:
    """``sys.stderr`` writes to file descriptor 2 (not a test's capture or a replaced stream)."""
    try:
        return sys.stderr.fileno() == 2
    except (AttributeError, OSError, io.UnsupportedOperation):
        return False


_log_path: Path | None = None  # the open job log, until its path is printed
_command = ""


def announce_log() -> None:
    """Print the open job log's path once, when Ray or img2dataset start writing there."""
    global _log_path
    if _log_path is not None and _terminal is not None:
        print(f"clipcap {_command}: Ray's output and the job's log: {_log_path}", file=_terminal, flush=True)
        _log_path = None


@contextlib.contextmanager
def job_log(command: str) -> Iterator[Path | None]:
    """Send fd 2 to ``clipcap-<command>-<time>-<pid>.log`` in ``$CLIPCAP_LOG_DIR`` (default ``<tmp>/clipcap-logs``)
    for the block, the project's warnings copied to the terminal; an empty log is removed. Yields None and changes
    nothing when stderr is not the process's fd 2."""
    global _terminal, _log_path, _command
    if not _owns_fd2():
        yield None
        return
    log_dir = Path(os.environ.get("CLIPCAP_LOG_DIR") or Path(tempfile.gettempdir()) / "clipcap-logs")
    path = log_dir / f"clipcap-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _terminal = open(saved, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    _log_path, _command = path, command
    if sys.stdout.isatty():  # Ray Data's tqdm bars would fill the log with cursor codes
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # workers' lines in the log without colour codes
    os.dup2(log_fd, 2)
    os.close(log_fd)
    echo = logging.StreamHandler(_terminal)
    echo.setLevel(logging.WARNING)
    echo.addFilter(lambda record: record.name.split(".", 1)[0] in PROJECT_LOGGERS)
    echo.setFormatter(logging.Formatter(f"clipcap {command}: %(levelname)s: %(message)s"))
    logging.getLogger().addHandler(echo)
    try:
        yield path
    finally:
        logging.getLogger().removeHandler(echo)
        sys.stderr.flush()
        _terminal.flush()
        os.dup2(saved, 2)
        os.close(saved)
        _terminal, _log_path = None, None
        if path.stat().st_size == 0:
            path.unlink()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return 0


class Progress(contextlib.AbstractContextManager):
    """Units (parts, shards, steps) done of ``total``, rows and error rows so far, rows/s and an ETA."""

    def __init__(self, what: str, total: int, *, unit: str = "parts", rows: str = "rows",
                 interval_s: float = 10.0, stream: TextIO | None = None, count_errors: bool = True):
        self.what, self.total, self.unit, self.rows_name = what, total, unit, rows
        self.count_errors = count_errors  # False: no "error rows" field (training counts steps, not rows)
        self.note = ""  # a short free field at the end of the line (``loss 0.91``)
        self.interval_s = float(os.environ.get("CLIPCAP_PROGRESS_EVERY_S") or interval_s)  # off a terminal
        self.stream = stream or terminal()
        self.done = self.rows = self.errors = 0
        self.start = self._last = time.monotonic()
        self._bar: Any = self._tqdm() if self.stream.isatty() else None

    def _tqdm(self) -> Any:
        sized = _columns(self.stream) > 0  # a pseudo-terminal may report 0 columns: a fixed width then
        return tqdm(total=self.total, desc=self.what, unit=f" {self.unit}", file=self.stream, dynamic_ncols=sized,
                    ncols=None if sized else 100, nrows=None if sized else 24,
                    bar_format="{desc}: {n_fmt}/{total_fmt}{unit} |{bar:20}| [{elapsed}<{remaining}]{postfix}")

    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return self.rows / elapsed if elapsed > 0 else 0.0

    def postfix(self) -> str:
        text = f"{self.rows} {self.rows_name}, {self.rate():.1f} {self.rows_name}/s"
        text += f", {self.errors} error rows" if self.count_errors else ""
        return f"{text}, {self.note}" if self.note else text

    def line(self) -> str:
        """The plain line: ``caption: 3/10 parts, 1200 images, 45.0 images/s, 2 error rows, ETA 1m20s``."""
        elapsed = time.monotonic() - self.start
        eta = _duration(elapsed * (self.total - self.done) / self.done) if self.done > 0 else "?"
        return f"{self.what}: {self.done}/{self.total} {self.unit}, {self.postfix()}, ETA {eta}"

    def update(self, units: int = 0, rows: int = 0, errors: int = 0) -> None:
        self.done, self.rows, self.errors = self.done + units, self.rows + rows, self.errors + errors
        if self._bar is not None:
            self._bar.set_postfix_str(self.postfix(), refresh=False)
            self._bar.update(units)
        elif time.monotonic() - self._last >= self.interval_s:
            self._last = time.monotonic()
            print(self.line(), file=self.stream, flush=True)

    def advance_to(self, done: int, rows: int, errors: int = 0, note: str = "") -> None:
        """Set absolute counts (a poller reading a job's own tally); a count never moves back (a restarted training
        attempt replays steps it had already counted)."""
        self.note = note or self.note
        self.update(max(0, done - self.done), max(0, rows - self.rows), max(0, errors - self.errors))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self.postfix(), refresh=False)
            self._bar.close()

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def watch(progress: Progress, read: Callable[[], tuple[int, int, int, str] | None], interval_s: float = 1.0
          ) -> Iterator[Progress]:
    """Advance ``progress`` from ``read() -> (done, rows, errors, note)`` every ``interval_s`` in a thread while
    the block runs, once more at the end, then close it; a ``read`` that raises or returns None is skipped."""
    stop = threading.Event()

    def poll() -> None:
        try:
            got = read()
        except Exception:  # noqa: BLE001 - a progress read must never fail the job
            return
        if got is not None:
            progress.advance_to(*got)

    def loop() -> None:
        while not stop.wait(interval_s):
            poll()

    thread = threading.Thread(target=loop, name=f"clipcap-progress-{progress.what}", daemon=True)
    thread.start()
    try:
        yield progress
    finally:
        stop.set()
        thread.join()
        poll()
        progress.close()


@contextlib.contextmanager
def stdout_to_log() -> Iterator[None]:
    """While a job log holds fd 2, send fd 1 there too for the block (img2dataset prints its progress to stdout,
    in this process and those it starts)."""
    if _terminal is None:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
