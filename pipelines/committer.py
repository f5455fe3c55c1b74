"""The one per-unit committer every stage's driver runs (embed: unit = shard; embed-text, caption: part), and
the output layout it commits into."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from clipcap_core import uris
from pipelines import stopping
from pipelines.io import storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnitTable:
    """A table folder of ``part-<unit>.parquet`` files and its bookkeeping folder ``meta`` (``errors/``,
    ``empty/`` done-markers, ``tmp/``), which no reader globs: a 0-row Parquet file breaks ``datasets``."""

    table: str
    meta: str

    def dir(self, name: str) -> str:
        return storage.join(self.meta, name)

    def part(self, unit: str) -> str:
        return storage.join(self.table, f"part-{unit}.parquet")

    def errors(self, unit: str) -> str:
        return storage.join(self.dir("errors"), f"part-{unit}.parquet")

    def empty(self, unit: str) -> str:
        return storage.join(self.dir("empty"), f"part-{unit}.json")

    def done(self) -> set[str]:
        """Units with a part file or an empty marker."""
        names = storage.list_files(self.table, ".parquet") + storage.list_files(self.dir("empty"), ".json")
        return {u.rsplit("/", 1)[-1].removeprefix("part-").rsplit(".", 1)[0] for u in names}

    def remove_temporaries(self) -> int:
        """Delete the ``_tmp.*`` files a killed run left (call it holding the output's lease)."""
        return storage.remove_temporaries(self.table, self.dir("errors"), self.dir("empty"), self.dir("tmp"),
                                          self.meta)

    def write(self, unit: str, table: pa.Table, errors: pa.Table, marker: dict[str, Any]) -> None:
        """The errors table (or drop a stale one), then the part file, or ``marker`` as the empty marker
        when no row is good: the commit marker is written last."""
        if errors.num_rows:
            storage.atomic_write_table(errors, self.errors(unit), tmp_dir=self.dir("tmp"))
        elif uris.exists(self.errors(unit)):  # from an earlier attempt at this unit
            storage.remove(self.errors(unit))
        if table.num_rows:
            storage.atomic_write_table(table, self.part(unit), tmp_dir=self.dir("tmp"))
        else:
            storage.write_json(marker, self.empty(unit))


class UnitCommitter:
    """Collects rows per unit (dedup by member index) and settles each unit once all its members arrived."""

    def __init__(self, *, unit: str = "part_id", index: str = "index", total: str = "total", noun: str = "part"):
        self.unit_col, self.index_col, self.total_col, self.noun = unit, index, total, noun
        self._rows: dict[str, list[pa.Table]] = {}
        self._seen: dict[str, np.ndarray] = {}  # member indices arrived, per unit
        self._totals: dict[str, int] = {}
        self._settled: set[str] = set()
        self.committed: list[str] = []
        self.failed: dict[str, str] = {}  # unit -> why its input could not be read (not committed)
        self.retry_delays: tuple[float, ...] = RETRY_DELAYS_S
        # called before each unit is written (the output's ``Lease.check``): what it raises fails the unit
        self.guard: Callable[[], None] | None = None

    # --- the stage's hooks ---------------------------------------------------------------------------------
    def unread(self, unit: str, rows: pa.Table | None) -> str | None:
        """Why the unit's input could not be read (then it is not committed), or None."""
        return None

    def commit(self, unit: str, rows: pa.Table | None) -> Any:
        """Write one complete unit (``rows``: its member rows, None when it has none); returns the stage's counts."""
        raise NotImplementedError

    # --- collecting -----------------------------------------------------------------------------------------
    def add(self, block: pa.Table) -> list[Any]:
        """Take a block of rows; return what ``commit`` returned for each unit this block completed."""
        units = block.column(self.unit_col).to_numpy().astype(str)
        index, total = block.column(self.index_col).to_numpy(), block.column(self.total_col).to_numpy()
        done = []
        for unit in dict.fromkeys(units.tolist()):
            if unit in self._settled:
                continue  # a late copy of a retried task's rows
            mask = units == unit
            self._take(unit, block, mask, index[mask], total[mask])
            if self._complete(unit):
                done.append(self._settle(unit, self._pop(unit)))
        return [r for r in done if r is not None]

    def _take(self, unit: str, block: pa.Table, mask: np.ndarray, index: np.ndarray, total: np.ndarray) -> None:
        if (total >= 0).any():
            self._totals[unit] = int(total[total >= 0][0])
        seen = self._seen.get(unit, np.zeros(0, dtype=np.int64))
        keep = np.zeros(len(index), dtype=bool)
        _, first = np.unique(index, return_index=True)  # first row of each index in this block
        keep[first] = True
        keep &= (index >= 0) & ~np.isin(index, seen)
        self._seen[unit] = np.concatenate([seen, index[keep]])
        self._rows.setdefault(unit, [])
        if keep.any():  # a copy: the driver keeps no view of Ray's block buffers
            self._rows[unit].append(block.take(pa.array(np.flatnonzero(mask)[keep])))

    def _complete(self, unit: str) -> bool:
        if unit not in self._totals:
            return False
        got, total = len(self._seen[unit]), self._totals[unit]
        if got > total:
            raise RuntimeError(f"{self.noun} {unit}: got {got} rows, expected {total}")
        return got == total

    def _pop(self, unit: str) -> pa.Table | None:
        pieces = self._rows.pop(unit, [])
        self._seen.pop(unit, None)
        self._totals.pop(unit, None)
        # a column all null in one block is typed null there: promote it
        return pa.concat_tables(pieces, promote_options="default") if pieces else None

    def _settle(self, unit: str, rows: pa.Table | None) -> Any:
        self._settled.add(unit)
        why = self.unread(unit, rows)
        if why is not None:
            self.failed[unit] = why
            log.error("%s %s is not done (a rerun retries it): %s", self.noun, unit, why)
            return None
        with stopping.committing():  # a stop signal waits until the unit is written
            result = self._commit_with_retries(unit, rows)
            self.committed.append(unit)
        return result

    def _commit_with_retries(self, unit: str, rows: pa.Table | None) -> Any:
        """``commit``, retried with backoff while the storage error is transient; a deterministic error, the
        last retry or a failing ``guard`` is ``CommitFailed`` (exit 4). A retry rewrites the same names."""
        try:
            if self.guard is not None:
                self.guard()
        except Exception as exc:  # noqa: BLE001 - e.g. lease.LeaseLost: another run owns the output now
            raise stopping.CommitFailed(self.noun, unit, exc) from exc
        for attempt in range(len(self.retry_delays) + 1):
            try:
                return self.commit(unit, rows)
            except Exception as exc:  # noqa: BLE001 - classified below; anything else goes up unchanged
                if not (isinstance(exc, OSError) or is_transient(exc)):
                    raise
                if not is_transient(exc) or attempt == len(self.retry_delays):
                    raise stopping.CommitFailed(self.noun, unit, exc) from exc
                log.warning("%s %s: writing failed (%s: %s); retry %d of %d in %.0f s", self.noun, unit,
                            type(exc).__name__, str(exc)[:200], attempt + 1, len(self.retry_delays),
                            self.retry_delays[attempt])
                time.sleep(self.retry_delays[attempt])
        raise AssertionError("unreachable")

    def pending(self) -> list[str]:
        return sorted(set(self._rows) | set(self._totals))

    def finish(self, stage: str, expected: Iterable[str] = ()) -> list[Any]:
        """End of stream: fail on a unit with lost rows, then settle ``expected`` units without rows."""
        if self.pending():
            raise RuntimeError(f"{stage} ended with incomplete {self.noun}(s) {self.pending()[:5]} (rows lost?)")
        done = [self._settle(u, None) for u in sorted(set(expected) - self._settled)]
        return [r for r in done if r is not None]


RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 15.0)  # ~30 s in all: a restarted object store is back well within it
_TRANSIENT_NAMES = ("EndpointConnectionError", "ConnectTimeout", "ReadTimeout", "ConnectionClosedError",
                    "ClientOSError", "ServerDisconnectedError", "ClientConnectorError", "ConnectionError",
                    "ConnectionRefusedError", "ConnectionResetError", "TimeoutError", "BrokenPipeError")
_TRANSIENT_TEXT = ("connection refused", "connection reset", "timed out", "could not connect", "slow down",
                   "slowdown", "service unavailable", "internal server error", "internalerror", "bad gateway",
                   "gateway timeout", "throttl")


def is_transient(exc: BaseException) -> bool:
    """A storage error worth retrying: the service was unreachable or overloaded, not the request wrong."""
    for e in (exc, exc.__cause__, exc.__context__):
        if e is not None and ({c.__name__ for c in type(e).__mro__} & set(_TRANSIENT_NAMES)
                              or any(t in str(e).lower() for t in _TRANSIENT_TEXT)):
            return True
    return False

