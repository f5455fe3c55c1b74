"""pipelines.io.storage: atomic table writes, listing, JSON, writability checks (local and memory://)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipcap_core import uris
from pipelines.io import storage


def test_join_and_full_uri():
    assert storage.join("s3://b/root/", "/embeddings", "cc3m/") == "s3://b/root/embeddings/cc3m"
    fs, path = uris.filesystem("memory://x/y")
    assert storage.full_uri(fs, path).startswith("memory://")
    fs, path = uris.filesystem("/tmp/abc")
    assert storage.full_uri(fs, path) == "/tmp/abc"


@pytest.mark.parametrize("root", ["local", "memory://storage-test"])
def test_atomic_write_and_listing(root, tmp_path):
    root = str(tmp_path) if root == "local" else root
    table = pa.table({"key": ["a", "b"], "x": [1, 2]})
    uri = storage.join(root, "t", "part-00000.parquet")
    storage.atomic_write_table(table, uri)
    fs, path = uris.filesystem(uri)
    with fs.open(path, "rb") as f:
        assert pq.read_table(f).equals(table)
    fs.pipe(uris.filesystem(storage.join(root, "t", "_tmp.abc.part-00001.parquet"))[1], b"partial")
    def norm(found: list[str]) -> list[str]:  # memory:// lists as memory:///...: compare filesystem paths
        return [uris.filesystem(u)[1].lstrip("/") for u in found]

    assert norm(storage.list_files(storage.join(root, "t"), ".parquet")) == norm([uri])  # temporaries not listed
    assert [p for p in fs.ls(uris.filesystem(storage.join(root, "t"))[1], detail=False)
            if "_tmp." in p and "abc" not in p] == []  # the writer's own temporary is gone
    assert storage.list_files(storage.join(root, "missing"), ".parquet") == []
    assert norm(storage.list_files(root, ".parquet", recursive=True)) == norm([uri])


@pytest.mark.parametrize("root", ["local", "memory://storage-temporaries"])
def test_remove_temporaries_removes_only_temporaries_of_the_named_folders(root, tmp_path):
    """What embed and caption run before a job: a killed writer's ``_tmp.*`` files go, parts and other
    folders' temporaries stay, and a missing folder is no error."""
    root = str(tmp_path) if root == "local" else root
    part, other = storage.join(root, "t", "part-00000.parquet"), storage.join(root, "other", "_tmp.x.parquet")
    storage.atomic_write_table(pa.table({"key": ["a"]}), part)
    for uri in (storage.join(root, "t", "_tmp.a.part-00001.parquet"), storage.join(root, "t", "meta", "_tmp.b.json"),
                other):
        fs, path = uris.filesystem(uri)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe(path, b"partial")
    n = storage.remove_temporaries(storage.join(root, "t"), storage.join(root, "t", "meta"), storage.join(root, "nope"))
    assert n == 2
    fs, _ = uris.filesystem(root)
    assert fs.exists(uris.filesystem(part)[1]) and fs.exists(uris.filesystem(other)[1])
    assert not [p for p in fs.find(uris.filesystem(storage.join(root, "t"))[1]) if "_tmp." in p]


def test_json_round_trip_and_default(tmp_path):
    uri = str(tmp_path / "d" / "m.json")
    storage.write_json({"a": 1, "b": [1, 2]}, uri)
    assert storage.read_json(uri) == {"a": 1, "b": [1, 2]}
    assert storage.read_json(str(tmp_path / "none.json"), default={"x": 0}) == {"x": 0}
    assert uris.exists(uri) and not uris.exists(str(tmp_path / "none.json"))


def test_check_writable(tmp_path):
    storage.check_writable(str(tmp_path / "new" / "dir"))
    assert list((tmp_path / "new" / "dir").iterdir()) == []  # the probe is removed
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="not writable"):
        storage.check_writable(str(blocker / "sub"))
    with pytest.raises(OSError, match="not writable"):
        storage.check_writable("nosuchscheme://bucket/x")


@pytest.mark.integration
def test_a_json_document_rewritten_while_read_on_s3_reads_whole(s3_uri):
    """A reader racing a writer (a lease heartbeat, a run record) sees one version or the other, never an
    error: a reader that fetched by ranges pinned to the first ETag failed with FileExpired here."""
    import threading

    uri = storage.join(s3_uri, "lease.json")
    storage.write_json({"beat": 0, "pad": "x" * 100}, uri)
    stop = threading.Event()

    def rewrite() -> None:
        beat = 0
        while not stop.is_set():
            beat += 1
            storage.write_json({"beat": beat, "pad": "x" * 100}, uri)

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        seen = [storage.read_json(uri)["beat"] for _ in range(150)]
    finally:
        stop.set()
        writer.join()
    assert seen == sorted(seen) and seen[-1] > seen[0]  # every read whole, and the writer did move on


@pytest.mark.integration
def test_a_listing_on_s3_sees_files_another_process_wrote_since(s3_uri, s3_server):
    """Listings are never served from s3fs's per-instance cache: a download polled its folder (our progress line)
    and then missed every shard img2dataset's processes wrote afterwards."""
    import s3fs

    folder = storage.join(s3_uri, "shards")
    storage.write_json({"n": 0}, storage.join(folder, "00000_stats.json"))
    assert len(storage.list_files(folder, "_stats.json")) == 1  # fills this process's listing cache
    other = s3fs.S3FileSystem(skip_instance_cache=True, **uris.filesystem(folder)[0].storage_options)
    other.pipe(uris.filesystem(folder)[1] + "/00001_stats.json", b"{}")  # as another process would
    assert [u.rsplit("/", 1)[-1] for u in storage.list_files(folder, "_stats.json")] == [
        "00000_stats.json", "00001_stats.json"]
