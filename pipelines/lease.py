"""One run at a time per output: a lease file under the output's ``_meta/`` (nightly: ``<state>/lock.json``)
taken by an exclusive create (``O_EXCL``; S3: ``If-None-Match: *``) and a read-back. Takeover and renewal
are not compare-and-swap: a heartbeat checks the file still names this run, else no unit is committed."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

from clipcap_core import uris
from pipelines import stopping
from pipelines.exitcodes import USAGE, JobFailed
from pipelines.io import storage

log = logging.getLogger(__name__)

LEASE_FILE = "lease.json"
STALE_AFTER_S = 120.0  # a lease not renewed this long belongs to a dead run
RENEW_EVERY_S = 15.0
SETTLE_S = 1.0  # after a takeover: longer than one renewal's read + write
FORCE_HINT = "rerun with --force-unlock to take it anyway"


class LeaseHeld(JobFailed):
    """Another live run holds the lease: exit 2, before any work."""

    def __init__(self, message: str):
        super().__init__(message, USAGE)


class LeaseLost(RuntimeError):
    """This run's lease was taken over (forced, or judged stale) or removed while it ran."""


@dataclass(frozen=True)
class Owner:
    """Who holds a lease (``run`` is unique per run: the token a heartbeat checks)."""

    host: str
    pid: int
    run: str
    started_at: str
    renewed_at: str
    pid_space: str = ""  # boot id + pid namespace: where ``pid`` means this process (``_pid_space``)

    def process_gone(self) -> bool:
        """The owner ran in this process space and its pid no longer exists."""
        if not self.pid_space or self.pid_space != _pid_space() or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def age_s(self) -> float:
        """Seconds since the last renewal (by this host's clock)."""
        return time.time() - datetime.fromisoformat(self.renewed_at).timestamp()

    def describe(self) -> str:
        return (f"host {self.host}, pid {self.pid}, run {self.run}, since {self.started_at} "
                f"(renewed {self.age_s():.0f} s ago)")


class Lease:
    """The lease at ``uri`` for one run (a context manager: acquire + heartbeat, then release)."""

    def __init__(self, uri: str, *, run: str | None = None, force: bool = False, override: str = FORCE_HINT,
                 stale_after_s: float = STALE_AFTER_S, renew_every_s: float = RENEW_EVERY_S):
        self.uri, self.force, self.override = uri, force, override
        self.stale_after_s, self.renew_every_s = stale_after_s, renew_every_s
        now = _iso(time.time())
        self.owner = Owner(host=socket.gethostname(), pid=os.getpid(), run=run or _run_id(), started_at=now,
                           renewed_at=now, pid_space=_pid_space())
        self.lost: LeaseLost | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- taking and giving back ---------------------------------------------------------------------------
    def acquire(self) -> None:
        """Create the lease file or take over a stale (or forced) one, then read back; ``LeaseHeld``: live."""
        took_over = False
        for _ in range(5):
            if self._create():
                if took_over:
                    time.sleep(SETTLE_S)  # a renewal in flight of the run taken over lands before the read-back
                if (holder := self.read()) is not None and holder.run == self.owner.run:
                    log.debug("lease %s held by %s", self.uri, self.owner.describe())
                    return
            holder = self.read()
            if holder is not None and holder.run != self.owner.run:
                self._take_over(holder)
                took_over = True
        raise LeaseHeld(f"could not take the lease {self.uri}: other runs are taking it at the same time"
                        + (f" ({holder.describe()})" if holder else ""))

    def _create(self) -> bool:
        fs, path = uris.filesystem(self.uri)
        storage.ensure_dir(fs, path.rsplit("/", 1)[0])
        try:
            with fs.open(path, "xb") as f:
                f.write(json.dumps(asdict(self.owner), indent=2).encode())
            return True
        except FileExistsError:
            return False

    def _take_over(self, holder: Owner) -> None:
        stale, gone = holder.age_s() >= self.stale_after_s, holder.process_gone()
        if not (stale or gone or self.force):
            raise LeaseHeld(f"{self.uri} is held by another run: {holder.describe()}. Wait for it to end; if it "
                            f"is dead, its lease goes stale {self.stale_after_s:.0f} s after its last renewal, "
                            f"or {self.override}")
        why = (f"not renewed for {holder.age_s():.0f} s" if stale else
               f"its process {holder.pid} on this host is gone" if gone else "forced")
        log.warning("taking over the lease %s (%s) of %s", self.uri, why, holder.describe())
        if self.read() == holder:  # the one judged, not a newer owner's
            storage.remove(self.uri)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease file if it still names this run (errors only logged)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            holder = self.read()
            if holder is not None and holder.run == self.owner.run:
                storage.remove(self.uri)
        except Exception as exc:  # noqa: BLE001 - releasing must not hide the run's own outcome
            log.warning("could not release the lease %s (%s: %s); it goes stale in %.0f s", self.uri,
                        type(exc).__name__, exc, self.stale_after_s)

    # --- while running --------------------------------------------------------------------------------------
    def renew(self) -> None:
        """One heartbeat: check the file still names this run (else ``LeaseLost``), then stamp ``renewed_at``."""
        holder = self.read()
        if holder is None or holder.run != self.owner.run:
            who = f"taken by {holder.describe()}" if holder else "removed"
            raise LeaseLost(f"the lease {self.uri} of this run ({self.owner.run}) was {who}")
        self.owner = replace(self.owner, renewed_at=_iso(time.time()))
        storage.write_json(asdict(self.owner), self.uri)

    def check(self) -> None:
        """Raise ``LeaseLost`` if a heartbeat found the lease taken (called before each unit is committed)."""
        if self.lost is not None:
            raise self.lost

    def read(self) -> Owner | None:
        """The owner the lease file names, None without one (a file still being created is waited for)."""
        fs, path = uris.filesystem(self.uri)
        for _ in range(20):
            fs.invalidate_cache(path)  # another process writes it: no cached listing or size
            try:
                return Owner(**json.loads(fs.cat_file(path)))
            except FileNotFoundError:
                return None
            except (ValueError, KeyError, TypeError):
                time.sleep(0.05)  # an exclusive create writes after creating: empty for an instant
        return Owner(host="?", pid=0, run="unreadable", started_at=_iso(0), renewed_at=_iso(0))

    def _beat(self) -> None:
        while not self._stop.wait(self.renew_every_s):
            try:
                self.renew()
            except LeaseLost as exc:
                log.error("%s: this run commits no further unit", exc)
                self.lost = exc
                return
            except Exception as exc:  # noqa: BLE001 - a storage hiccup: the next beat retries
                log.warning("renewing the lease %s failed (%s: %s); retrying", self.uri, type(exc).__name__, exc)

    def __enter__(self) -> Lease:
        try:
            with stopping.committing():  # a stop signal waits until the lease file is whole
                self.acquire()
        except BaseException:
            self.release()
            raise
        self._thread = threading.Thread(target=self._beat, name=f"lease {self.uri}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _pid_space() -> str:
    """Boot id + pid namespace (Linux; "" elsewhere): where a pid means this process, not just the host."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{socket.gethostname()}:{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


def _run_id() -> str:
    return f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}"
