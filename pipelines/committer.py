"""The one per-unit committer every stage's driver runs: embed (unit = shard), embed-text and caption (part).

Rows stream back to the driver in blocks, a unit's rows spread over any number of blocks and actors.
``UnitCommitter`` collects them per unit and settles each unit once, as soon as it is complete. The protocol
(columns named per stage):
- ``unit``: the unit the row belongs to; ``index``: its member index in the unit (-1: a marker row, no member);
- ``total`` >= 0 on a row says how many members its unit has. Embed and embed-text put it on every row;
  caption's read tasks on one marker row per part (which also announces a part without members).
A unit is complete when ``total`` distinct member indices arrived: a row that arrives twice (Ray retried the
task that made it) is kept once, and rows of a unit already settled are dropped. A complete unit whose input
could not be read (the ``unread`` hook names why) is *failed*: logged, listed in ``failed``, not committed, so a
rerun retries it; any other is handed to the ``commit`` hook, the stage's writer (errors table, then the part
file or an empty marker). A stop signal during a commit waits until the unit is written
(``stopping.committing``); a storage error while writing it raises ``stopping.CommitFailed`` naming the unit.
Subclasses implement the two hooks; ``finish`` settles the units that got no rows at all and fails the run if
rows were lost. Blocks are numpy column dicts (embed) or pyarrow tables (caption); a
unit's member rows reach the hooks in the same format, concatenated in arrival order, markers dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines import stopping

log = logging.getLogger(__name__)

Block = dict[str, np.ndarray] | pa.Table


class UnitCommitter:
    """Collects rows per unit (dedup by member index) and settles each unit once all its members arrived."""

    def __init__(self, *, unit: str = "part_id", index: str = "index", total: str = "total", noun: str = "part"):
        self.unit_col, self.index_col, self.total_col, self.noun = unit, index, total, noun
        self._rows: dict[str, list[Block]] = {}
        self._seen: dict[str, np.ndarray] = {}  # member indices arrived, per unit
        self._totals: dict[str, int] = {}
        self._settled: set[str] = set()
        self.committed: list[str] = []
        self.failed: dict[str, str] = {}  # unit -> why its input could not be read (not committed)

    # --- the stage's hooks ---------------------------------------------------------------------------------
    def unread(self, unit: str, rows: Block | None) -> str | None:
        """Why the unit's input could not be read (then it is not committed), or None."""
        return None

    def commit(self, unit: str, rows: Block | None) -> Any:
        """Write one complete unit (``rows``: its member rows, None when it has none); returns the stage's counts."""
        raise NotImplementedError

    # --- collecting -----------------------------------------------------------------------------------------
    def add(self, block: Block) -> list[Any]:
        """Take a block of rows; return what ``commit`` returned for each unit this block completed."""
        units = _column(block, self.unit_col).astype(str)
        index, total = _column(block, self.index_col), _column(block, self.total_col)
        done = []
        for unit in dict.fromkeys(units.tolist()):
            if unit in self._settled:
                continue  # a late copy of a retried task's rows
            mask = units == unit
            self._take(unit, block, mask, index[mask], total[mask])
            if self._complete(unit):
                done.append(self._settle(unit, self._pop(unit)))
        return [r for r in done if r is not None]

    def _take(self, unit: str, block: Block, mask: np.ndarray, index: np.ndarray, total: np.ndarray) -> None:
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
            self._rows[unit].append(_take(block, np.flatnonzero(mask)[keep]))

    def _complete(self, unit: str) -> bool:
        if unit not in self._totals:
            return False
        got, total = len(self._seen[unit]), self._totals[unit]
        if got > total:
            raise RuntimeError(f"{self.noun} {unit}: got {got} rows, expected {total}")
        return got == total

    def _pop(self, unit: str) -> Block | None:
        pieces = self._rows.pop(unit, [])
        self._seen.pop(unit, None)
        self._totals.pop(unit, None)
        return _concat(pieces) if pieces else None

    def _settle(self, unit: str, rows: Block | None) -> Any:
        self._settled.add(unit)
        why = self.unread(unit, rows)
        if why is not None:
            self.failed[unit] = why
            log.error("%s %s is not done (a rerun retries it): %s", self.noun, unit, why)
            return None
        with stopping.committing():  # a stop signal waits until the unit is written
            try:
                result = self.commit(unit, rows)
            except OSError as exc:  # disk full, read-only output: work began, so no usage error
                raise stopping.CommitFailed(self.noun, unit, exc) from exc
            self.committed.append(unit)
        return result

    def pending(self) -> list[str]:
        """Units with rows but not complete."""
        return sorted(set(self._rows) | set(self._totals))

    def finish(self, stage: str, expected: Iterable[str] = ()) -> list[Any]:
        """At the end of the stream: fail if a unit is incomplete (rows lost in the pipeline), then settle the
        ``expected`` units that got no row at all (embed: a shard without samples)."""
        if self.pending():
            raise RuntimeError(f"{stage} ended with incomplete {self.noun}(s) {self.pending()[:5]} (rows lost?)")
        done = [self._settle(u, None) for u in sorted(set(expected) - self._settled)]
        return [r for r in done if r is not None]


def _column(block: Block, name: str) -> np.ndarray:
    if isinstance(block, pa.Table):
        return block.column(name).to_numpy()
    return np.asarray(block[name])


def _take(block: Block, rows: np.ndarray) -> Block:
    if isinstance(block, pa.Table):
        return block.take(pa.array(rows))
    return {k: np.asarray(v)[rows] for k, v in block.items()}


def _concat(pieces: list[Block]) -> Block:
    if len(pieces) == 1:
        return pieces[0]
    if isinstance(pieces[0], pa.Table):  # a column all null in one block is typed null there: promote it
        return pa.concat_tables(pieces, promote_options="default")
    return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
