"""How a job stops part-way: on SIGTERM / SIGINT (``Interrupted``, a ``BaseException``, waits for a commit in
flight) or when its output cannot take a unit (``CommitFailed``).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from pipelines import exitcodes

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A stop signal arrived; the job stops committing and exits 128 + ``signum``."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.progress: str | None = None  # units committed of all (``counting``)

    @property
    def exit_code(self) -> int:
        return exitcodes.signal_code(self.signum)

    def line(self, prog: str) -> str:
        """The one stderr line (the same for every command, so scripts can match it)."""
        if self.progress is None:
            return f"stopped by {signal.Signals(self.signum).name}"
        return f"stopped: {self.progress}"


class CommitFailed(Exception):
    """Writing a unit failed after work began (``cause``: the storage error); the unit is not committed."""

    def __init__(self, noun: str, unit: str, cause: BaseException):
        super().__init__(f"{noun} {unit} not committed: {type(cause).__name__}: {cause}")
        self.progress: str | None = None
        self.exit_code = exitcodes.PARTIAL

    def line(self, prog: str) -> str:
        """The one stderr line: ``prog`` (``clipcap caption``), the unit and the cause, the units committed."""
        done = f"; {self.progress}" if self.progress is not None else ""
        return f"{prog}: error: {self}{done}"


class _State:
    """The handler's state: ``on_signals`` active, commit depth, a held-back signal, whether one fired."""

    active = False
    depth = 0
    pending: int | None = None
    fired = False


_state = _State()


def _handle(signum: int, _frame: FrameType | None) -> None:
    if _state.fired:
        return  # already stopping: a second signal must not break the shutdown
    if _state.depth:
        _state.pending = signum  # raised when the unit being written is committed
        return
    _state.fired = True
    raise Interrupted(signum)


@contextmanager
def on_signals(enabled: bool = True) -> Iterator[None]:
    """SIGTERM / SIGINT raise ``Interrupted`` inside the block (``enabled``, main thread only)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handle) for s in SIGNALS}
    _state.active, _state.depth, _state.pending, _state.fired = True, 0, None, False
    try:
        yield
    finally:
        _state.active = False
        for s, handler in previous.items():
            signal.signal(s, handler)


def reinstall() -> None:
    """Take the signals back from a library that set its own handlers (``ray.init``) while active."""
    if _state.active and threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _handle)


@contextmanager
def starting_ray() -> Iterator[None]:
    """Around ``ray.init``: Ray's SIGTERM handler is not installed and a stop signal waits until Ray is up."""
    # lazy: ray ~0.8 s (ray.data ~2.1 s) to import (python -X importtime)
    import ray._private.utils as ray_utils  # where ray.init installs its handler from

    own = ray_utils.set_sigterm_handler
    if _state.active:
        ray_utils.set_sigterm_handler = lambda _handler: None
    try:
        with committing():
            yield
    finally:
        ray_utils.set_sigterm_handler = own
        reinstall()


@contextmanager
def committing() -> Iterator[None]:
    """Hold a stop signal back while one unit is written; raise it once the unit is committed."""
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
    if not _state.depth and _state.pending is not None and not _state.fired:
        signum, _state.pending, _state.fired = _state.pending, None, True
        raise Interrupted(signum)


@contextmanager
def counting(count: Callable[[], tuple[int, int]], noun: str) -> Iterator[None]:
    """Attach ``count()`` = (units committed, units in all) to a stop leaving the block."""
    try:
        yield
    except (Interrupted, CommitFailed) as exc:
        if exc.progress is None:
            done, total = count()
            exc.progress = f"{done} of {total} {noun}s committed; rerun resumes"
        raise


def run(call: Callable[[], int], prog: str, signals: bool = True) -> int:
    """``call()`` under ``on_signals``; a stop releases the Ray session it opened and becomes one line."""
    connected = _ray_connected()  # a session opened before (a caller's own) is the caller's to keep
    with on_signals(signals):
        try:
            return call()
        except (Interrupted, CommitFailed) as exc:
            _state.fired = True
            if not connected:
                release_ray()
            from pipelines.console import terminal

            print(exc.line(prog), file=terminal(), flush=True)
            return exc.exit_code


def _ray_connected() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def release_ray() -> None:
    """Disconnect this driver from Ray: its actors and tasks end, and a local instance it started stops."""
    if _ray_connected():
        # lazy: ray ~0.8 s (ray.data ~2.1 s) to import (python -X importtime)
        import ray

        ray.shutdown()
