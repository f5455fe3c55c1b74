"""Archive readers: planning is deterministic, every kind is read, every bad member is an error record."""

from __future__ import annotations

import collections
import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipcap_core.imaging import ImageDecodeError, decode_image
from pipelines.io import sources
from pipelines.io.sources import SourceConfig, plan_digest, plan_parts, read_part
from tests.pipelines.image_zoo import DUP_ERROR_KEYS, good_images, write_mixed_input

DIM = 16


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, http_server):
    root = tmp_path_factory.mktemp("mixed")
    # the HTTP server serves its own root: put the mixed input there so URL rows resolve
    sub = root.name
    target = http_server.root / sub
    expect = write_mixed_input(target, base_url=f"{http_server.base_url}/{sub}", dim=DIM, clip_model="tiny")
    return target, expect


def _status(rec: sources.Record) -> bool:
    if rec.error is not None:
        return False
    if rec.embedding is not None:
        return True
    try:
        decode_image(rec.data or b"")
        return True
    except ImageDecodeError:
        return False


def test_every_kind_is_read_and_bad_members_are_error_records(mixed):
    root, expect = mixed
    cfg = SourceConfig(part_size=5, allow_private_urls=True)  # the URL rows point at the 127.0.0.1 server
    parts = plan_parts(str(root), cfg)
    records = [r for p in parts for r in read_part(p, cfg)]
    got = collections.defaultdict(list)
    for r in records:
        got[r.key].append(_status(r))
    assert len(records) == len(expect) + len(DUP_ERROR_KEYS)
    assert set(got) == set(expect)
    for key, ok in expect.items():
        assert got[key][0] is ok, (key, [r.error for r in records if r.key == key])
    for key in DUP_ERROR_KEYS:
        assert got[key] == [True, False]
    kinds = collections.Counter(p.kind for p in parts)
    assert kinds["webdataset"] == 1 and kinds["tar"] == 3 and kinds["zip"] == 2 and kinds["embeddings"] == 1
    assert kinds["unreadable"] == 1 and kinds["parquet"] == 2  # bytes (2 row groups of 2 rows) + urls
    assert kinds["images"] == 4  # 16 loose files, 5 per part
    # Parquet row groups are packed up to part_size rows; part ids record the first row group
    small = [p for p in plan_parts(str(root / "tables/bytes.parquet"), SourceConfig(part_size=2))]
    assert [(p.row_groups, p.row_offset) for p in small] == [((0,), 0), ((1,), 2)]
    assert [r.key for p in small for r in read_part(p, cfg)] == [f"bytes.parquet/p{i}" for i in range(4)]


def test_error_records_say_why(mixed):
    root, _ = mixed
    cfg = SourceConfig(allow_private_urls=True)
    errors = {r.key: r.error for p in plan_parts(str(root), cfg) for r in read_part(p, cfg) if r.error}
    assert "absolute" in errors["archives/plain.tar//abs/evil.png"]
    assert "'..'" in errors["archives/plain.tar/../escape.png"]
    assert "link" in errors["archives/plain.tar/photos/link.png"]
    assert "symlink" in errors["archives/pics.zip/z/link.png"]
    assert "unreadable archive" in errors["archives/cut.tar"]
    assert "unreadable archive" in errors["archives/broken.zip"]
    assert "no image member" in errors["wds/00000.tar/000000001"]
    assert "404" in errors["tables/urls.parquet/#1"]
    assert "not allowed" in errors["tables/urls.parquet/#2"]
    assert "non-finite" in errors["tables/emb.parquet/e1"]
    assert "unreadable Parquet" in errors["tables/broken.parquet"]


def test_plan_is_deterministic_and_digest_tracks_changes(mixed, tmp_path):
    root, _ = mixed
    cfg = SourceConfig(part_size=4)
    a, b = plan_parts(str(root), cfg), plan_parts(str(root), cfg)
    assert a == b and plan_digest(a) == plan_digest(b)
    ids = [p.part_id for p in a]
    assert len(set(ids)) == len(ids) and all(set(i) <= set("abcdefghijklmnopqrstuvwxyz"
                                                            "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") for i in ids)
    assert all(sources.Part.from_json(p.to_json()) == p for p in a)
    assert plan_digest(plan_parts(str(root), SourceConfig(part_size=5))) != plan_digest(a)


def test_explicit_formats_read_only_their_files(mixed):
    root, _ = mixed
    wds = plan_parts(str(root), SourceConfig(format="webdataset"))
    assert {p.kind for p in wds} == {"webdataset"} and len(wds) == 4  # every .tar / .tar.gz as a shard
    with pytest.raises(ValueError, match="not an embedding table"):
        plan_parts(str(root / "tables"), SourceConfig(format="embeddings"))
    only_emb = plan_parts(str(root / "tables/emb.parquet"), SourceConfig(format="embeddings"))
    assert [(p.kind, p.dim, p.clip_model) for p in only_emb] == [("embeddings", DIM, "tiny")]
    imgs = plan_parts(str(root / "archives"), SourceConfig(format="images"))
    assert {p.kind for p in imgs} == {"images"}  # archives read as (undecodable) loose files


def test_single_file_input_keys_start_with_its_name(tmp_path):
    data = good_images()["rgb.jpg"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("x/y.jpg")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    (tmp_path / "one.tar").write_bytes(buf.getvalue())
    parts = plan_parts(str(tmp_path / "one.tar"), SourceConfig())
    assert [r.key for r in read_part(parts[0], SourceConfig())] == ["one.tar/x/y.jpg"]


def test_size_limits_and_job_level_faults(tmp_path):
    (tmp_path / "big.jpg").write_bytes(good_images()["rgb.jpg"])
    cfg = SourceConfig(max_member_bytes=100)
    [rec] = [r for p in plan_parts(str(tmp_path), cfg) for r in read_part(p, cfg)]
    assert "too large" in rec.error
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plan_parts(str(tmp_path / "nope"), cfg)
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="no image column"):
        plan_parts(str(tmp_path / "t.parquet"), cfg)
    with pytest.raises(ValueError, match="unknown input format"):
        sources.get_reader("rar")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no input files"):
        plan_parts(str(empty), cfg)
    (empty / ".DS_Store").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"no input files .*skipped 1 hidden / bookkeeping"):
        plan_parts(str(empty), cfg)


@pytest.mark.parametrize("name,why", [("/etc/passwd", "absolute"), ("a/../../b", ".."), ("C:/x", "absolute"),
                                      ("..\\x", ".."), ("ok/a..b.jpg", None), ("./a.jpg", None)])
def test_unsafe_member_names(name, why):
    got = sources.unsafe_member(name)
    assert (got is None) if why is None else (why in got)


def test_underscore_files_are_input_and_hidden_or_bookkeeping_paths_are_named_skips(tmp_path, caplog):
    jpg = good_images()["rgb.jpg"]
    for rel in ("_DSC0001.JPG", "_raw/_DSC0002.JPG", "c.jpg", ".DS_Store", ".git/x.jpg", "_meta/run.json",
                "_tmp.1a2b.parquet", "sub/_SUCCESS"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(jpg)
    cfg = SourceConfig()
    keys = [r.key for p in plan_parts(str(tmp_path), cfg) for r in read_part(p, cfg) if r.error is None]
    assert keys == ["_DSC0001.JPG", "_raw/_DSC0002.JPG", "c.jpg"]
    with caplog.at_level("INFO", logger="pipelines.io.sources"):
        _, skipped = sources.plan_input(str(tmp_path), cfg)
    assert skipped == [".DS_Store", ".git/x.jpg", "_meta/run.json", "_tmp.1a2b.parquet", "sub/_SUCCESS"]
    assert "skipped 5 hidden / bookkeeping file(s)" in caplog.text and "_meta/run.json" in caplog.text


@pytest.mark.parametrize("mode,name", [("w:bz2", "a.tar.bz2"), ("w:xz", "a.tar.xz"), ("w:bz2", "a.tbz2"),
                                       ("w:xz", "a.txz")])
def test_bzip2_and_xz_tars_are_read_member_by_member_with_the_same_bounds(tmp_path, mode, name):
    jpg = good_images()["rgb.jpg"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for member, data in (("x/ok.jpg", jpg), ("big.jpg", jpg * 4), ("../up.jpg", jpg)):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (tmp_path / name).write_bytes(buf.getvalue())
    cfg = SourceConfig(max_member_bytes=len(jpg) * 2)
    [part] = plan_parts(str(tmp_path), cfg)
    recs = {r.key: r for r in read_part(part, cfg)}
    assert part.kind == "tar" and set(recs) == {f"{name}/x/ok.jpg", f"{name}/big.jpg", f"{name}/../up.jpg"}
    assert recs[f"{name}/x/ok.jpg"].data == jpg
    assert "too large" in recs[f"{name}/big.jpg"].error and "'..'" in recs[f"{name}/../up.jpg"].error


def test_webdataset_gives_one_row_per_key_and_names_every_other_image(tmp_path):
    jpg, png = good_images()["rgb.jpg"], good_images()["la.png"]
    members = [("a.jpg", jpg), ("a.png", png), ("a.txt", b"cap"), ("b.jpg", jpg), ("c.v1.jpg", jpg),
               ("c.v2.jpg", png), ("a.webp", jpg)]  # a.webp: key "a" again after other samples
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for member, data in members:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (tmp_path / "00000.tar").write_bytes(buf.getvalue())
    cfg = SourceConfig(format="webdataset")
    records = [r for p in plan_parts(str(tmp_path), cfg) for r in read_part(p, cfg)]
    keys = [r.key for r in records]
    assert len(keys) == len(set(keys))
    rows = {r.key: r.data for r in records if r.error is None}
    errors = {r.key: r.error for r in records if r.error is not None}
    assert rows == {"00000.tar/a": jpg, "00000.tar/b": jpg, "00000.tar/c": jpg}
    assert set(errors) == {"00000.tar/a.png", "00000.tar/c.v2.jpg", "00000.tar/a.webp"}
    assert "second image of sample 'a' (captioned from a.jpg)" in errors["00000.tar/a.png"]
    assert "second image of sample 'c'" in errors["00000.tar/c.v2.jpg"]
    assert "after other samples" in errors["00000.tar/a.webp"]
