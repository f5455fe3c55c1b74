"""pipelines.committer: the one per-unit committer of embed, embed-text and caption (no Ray, no files)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from clipcap_core import uris
from pipelines.committer import UnitCommitter


class _Recorder(UnitCommitter):
    """Commits into a dict; a unit is unread when one of its rows says ``unread``."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.written: dict[str, list[str] | None] = {}

    def unread(self, unit, rows):
        if rows is None:
            return None
        keys = rows.column("key").to_pylist()
        return "unreadable archive" if "unread" in keys else None

    def commit(self, unit, rows):
        keys = None if rows is None else rows.column("key").to_pylist()
        self.written[unit] = keys
        return unit, 0 if keys is None else len(keys)


def _every_row(unit: str, index: list[int], total: int, keys: list[str]) -> pa.Table:
    """Embed's protocol: the unit's total on every row."""
    n = len(index)
    return pa.table({"shard": [unit] * n, "index": pa.array(index, pa.int64()),
                     "shard_total": pa.array([total] * n, pa.int64()), "key": keys})


def _arrow(unit: str, index: list[int], keys: list[str], total: int | None = None) -> pa.Table:
    """Caption's protocol: members carry total -1; one marker row (index -1) carries the part's total."""
    index, keys = list(index), list(keys)
    totals = [-1] * len(index)
    if total is not None:
        index, keys, totals = index + [-1], keys + [""], totals + [total]
    return pa.table({"part_id": [unit] * len(index), "index": pa.array(index, pa.int32()), "key": keys,
                     "total": pa.array(totals, pa.int32()), "error": [None] * len(index)})


def test_total_on_every_row_units_complete_once_and_retried_rows_count_once():
    c = _Recorder(unit="shard", total="shard_total", noun="shard")
    assert c.add(_every_row("a", [0, 1], 3, ["k0", "k1"])) == []
    # a retried task re-sends rows 0 and 1; row 1 twice inside the block too
    assert c.add(_every_row("a", [1, 0, 1], 3, ["k1", "k0", "k1"])) == []
    mixed = pa.concat_tables([_every_row("a", [2], 3, ["k2"]), _every_row("b", [0], 1, ["j0"])])
    assert c.add(mixed) == [("a", 3), ("b", 1)]  # one block completes two units
    assert c.written == {"a": ["k0", "k1", "k2"], "b": ["j0"]} and c.pending() == []
    assert c.add(_every_row("a", [2], 3, ["k2"])) == []  # a late copy after the commit: dropped
    assert c.written["a"] == ["k0", "k1", "k2"] and c.pending() == [] and c.committed == ["a", "b"]
    # units the stream never mentioned (a shard without samples) are committed with no rows at the end
    assert c.finish("embedding", ["a", "b", "empty"]) == [("empty", 0)] and c.written["empty"] is None
    with pytest.raises(RuntimeError, match="shard c: got 2 rows, expected 1"):
        c.add(_every_row("c", [0, 1], 1, ["x", "y"]))


def test_marker_row_units_wait_for_the_marker_and_the_members():
    c = _Recorder()  # caption's column names are the defaults
    assert c.add(_arrow("p", [1], ["b"])) == []
    assert c.add(_arrow("p", [1], ["b"], total=3)) == []  # the marker before the last row; row 1 again
    assert c.pending() == ["p"]
    assert c.add(_arrow("p", [0, 2], ["a", "c"])) == [("p", 3)]
    assert c.written["p"] == ["b", "a", "c"]  # arrival order, markers dropped, row 1 once
    assert c.add(_arrow("empty", [], [], total=0)) == [("empty", 0)] and c.written["empty"] is None
    # a column typed null in one block (all None) and string in the next is promoted, not an error
    c.add(_arrow("q", [0], ["x"], total=2))
    second = _arrow("q", [1], ["y"]).set_column(4, "error", pa.array(["bad"], pa.string()))
    assert c.add(second) == [("q", 2)]


def test_unread_units_fail_without_commit_and_lost_rows_fail_the_run():
    c = _Recorder()
    assert c.add(_arrow("t", [0, 1], ["a", "unread"], total=2)) == []
    assert c.failed == {"t": "unreadable archive"} and "t" not in c.written and c.committed == []
    assert c.add(_arrow("t", [0], ["a"])) == []  # settled: a late row does not reopen it
    c.add(_arrow("lost", [], [], total=1))  # the marker says 1 member, the member never arrives
    with pytest.raises(RuntimeError, match=r"caption ended with incomplete part\(s\) \['lost'\] \(rows lost\?\)"):
        c.finish("caption")
    every_row_side = _Recorder(unit="shard", total="shard_total", noun="shard")
    every_row_side.add(_every_row("s", [0], 1, ["unread"]))
    assert every_row_side.failed == {"s": "unreadable archive"} and every_row_side.finish("embedding", ["s"]) == []


class _Flaky(_Recorder):
    """Commits after ``fail`` failures of ``error``."""

    def __init__(self, fail: int, error: BaseException, **kw):
        super().__init__(**kw)
        self.fail, self.error, self.attempts = fail, error, 0

    def commit(self, unit, rows):
        self.attempts += 1
        if self.attempts <= self.fail:
            raise self.error
        return super().commit(unit, rows)


def test_a_transient_storage_error_is_retried_with_a_bound_and_a_deterministic_one_is_not():
    from pipelines.stopping import CommitFailed

    c = _Flaky(2, ConnectionRefusedError(111, "Connection refused"), unit="shard", total="shard_total", noun="shard")
    c.retry_delays = (0.01, 0.01, 0.01)
    assert c.add(_every_row("a", [0], 1, ["k0"])) == [("a", 1)] and c.attempts == 3 and c.committed == ["a"]
    down = _Flaky(99, ConnectionRefusedError(111, "Connection refused"), unit="shard", total="shard_total",
                  noun="shard")
    down.retry_delays = (0.01, 0.01)
    with pytest.raises(CommitFailed, match="shard a not committed: ConnectionRefusedError"):
        down.add(_every_row("a", [0], 1, ["k0"]))
    assert down.attempts == 3 and down.committed == []
    full = _Flaky(99, OSError(28, "No space left on device"), unit="shard", total="shard_total", noun="shard")
    with pytest.raises(CommitFailed, match="No space left"):
        full.add(_every_row("a", [0], 1, ["k0"]))
    assert full.attempts == 1  # a full disk does not heal by waiting
    bug = _Flaky(1, KeyError("x"), unit="shard", total="shard_total", noun="shard")
    with pytest.raises(KeyError):
        bug.add(_every_row("a", [0], 1, ["k0"]))  # not a storage error: not retried, not disguised


@pytest.mark.integration
def test_a_stopped_s3_server_is_retried_until_it_is_back_or_the_bound():
    import threading

    from infra.local import s3
    from pipelines.io import storage
    from pipelines.stopping import CommitFailed

    server = s3.start(buckets=("clipcap",))
    env = server.env()
    # explicit options: a filesystem of its own (fsspec caches instances by their arguments), no botocore retries
    # on a refused connection, so the committer's own bound is what is measured
    options = {"key": env["AWS_ACCESS_KEY_ID"], "secret": env["AWS_SECRET_ACCESS_KEY"],
               "client_kwargs": {"endpoint_url": env["AWS_ENDPOINT_URL"], "region_name": "us-east-1"},
               "config_kwargs": {"retries": {"max_attempts": 1}}}

    class ToS3(_Recorder):
        def commit(self, unit, rows):
            table = rows.select(["key"])
            try:
                storage.atomic_write_table(table, f"s3://clipcap/retry/{unit}.parquet", options)
            except FileNotFoundError as exc:  # moto restarts empty: its bucket is back a moment after the port
                raise ConnectionError(f"bucket not back yet: {exc}") from exc
            return super().commit(unit, rows)

    try:
        c = ToS3(unit="shard", total="shard_total", noun="shard")
        c.retry_delays = (0.5, 0.5)
        assert c.add(_every_row("a", [0], 1, ["k0"])) == [("a", 1)]
        s3.stop(server.port)
        with pytest.raises(CommitFailed, match="shard b not committed"):
            c.add(_every_row("b", [0], 1, ["k1"]))
        assert c.committed == ["a"]
        # the server comes back during the retries: the part is committed, once
        c.retry_delays = (1.0, 2.0, 4.0, 8.0)
        threading.Timer(1.5, lambda: s3.start(port=server.port, buckets=("clipcap",))).start()
        assert c.add(_every_row("d", [0], 1, ["k3"])) == [("d", 1)]
        assert uris.exists("s3://clipcap/retry/d.parquet", options)
    finally:
        s3.stop(server.port)
