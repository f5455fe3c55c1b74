"""pipelines.embed.job: shards -> embedding tables on the real local Ray head, S3 output, errors, reruns, checks."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipcap_core import synthetic, uris
from clipcap_core.encoders import EncoderConfig, load_encoder
from pipelines.embed import stages as st
from pipelines.embed.job import EmbedConfig, EmbedResources, ShardCommitter, pending_shards, run_embed
from pipelines.io import schemas, storage


def _jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_shard(path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A webdataset tar like img2dataset's: ``{key}.jpg`` / ``.txt`` / ``.json`` per sample."""
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def good_samples(n: int, start: int) -> list[tuple[str, dict[str, bytes]]]:
    return [(s.key, {"jpg": _jpeg(s.image), "txt": s.caption.encode(),
                     "json": json.dumps({"key": s.key, "url": f"http://x/{s.key}.jpg"}).encode()})
            for s in synthetic.generate(n, seed=0, start=start)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    truncated = _jpeg(next(synthetic.generate(1, start=99)).image)[:200]
    write_shard(root / "00000.tar", good_samples(10, 0) + [
        ("bad-corrupt", {"jpg": b"\xff\xd8\xff garbage", "txt": b"corrupt"}),
        ("bad-text", {"png": b"this is a text file", "txt": b"not an image"}),
        ("bad-noimage", {"txt": b"caption only"}),
    ])
    pa_rows = [{"key": "dl-fail", "url": "http://x/404.jpg", "status": "failed_to_download",
                "error_message": "404 Not Found"}]
    pq.write_table(pa.Table.from_pylist(pa_rows), root / "00000.parquet")  # img2dataset's per-shard metadata
    write_shard(root / "00001.tar", good_samples(8, 10) + [("bad-truncated", {"jpg": truncated})])
    (root / "00002.tar").write_bytes(b"definitely not a tar archive" * 40)
    write_shard(root / "00003.tar", [])
    return root


def _cfg(shards, out, **kw) -> EmbedConfig:
    kw.setdefault("resources", EmbedResources(batch_size=8, torch_threads=1))
    return EmbedConfig(input=str(shards), output_root=str(out), dataset="unit", **kw)


@pytest.fixture(scope="module")
def embedded(shards, ray_cluster, s3_server):
    cfg = _cfg(shards, f"s3://clipcap/embed-unit-{np.random.default_rng().integers(1 << 30)}", text_embeddings=True)
    return cfg, run_embed(cfg)


def test_tables_rows_schema_and_metadata(embedded):
    cfg, result = embedded
    assert cfg.table_uri.endswith("/embeddings/unit/tiny")
    files = storage.list_files(cfg.table_uri, ".parquet")
    # 00002 is garbage: not committed; 00003 has no samples: marked done under _meta, no 0-row part file
    assert [f.rsplit("/", 1)[-1] for f in files] == ["part-00000.parquet", "part-00001.parquet"]
    assert storage.list_files(storage.join(cfg.meta_uri, "empty"), ".json")[0].endswith("part-00003.json")
    assert [u.rsplit("/", 1)[-1] for u in result.failed] == ["00002.tar"] and result.exit_code == 4
    table = pa.concat_tables([pq.read_table(f) for f in files])
    assert (result.rows, table.num_rows, result.written, result.skipped) == (18, 18, 3, 0)
    keys = table.column("key").to_pylist()
    assert len(set(keys)) == 18 and all(k.startswith("syn") for k in keys)
    assert schemas.validate_embedding_schema(table.schema) == result.dim == 128
    emb = np.asarray(table.column("image_embedding").combine_chunks().flatten()).reshape(-1, 128)
    text = np.asarray(table.column("text_embedding").combine_chunks().flatten()).reshape(-1, 128)
    assert np.isfinite(emb).all() and np.isfinite(text).all() and np.abs(emb).sum(1).min() > 0
    meta = schemas.read_metadata(pq.read_schema(files[0]))
    assert meta[schemas.META_CLIP_MODEL] == "tiny" and meta[schemas.META_DIM] == "128"
    assert meta[schemas.META_SOURCE_SHARD].endswith("00000.tar") and "size=64" in meta[schemas.META_PREPROCESS]
    row = table.filter(pa.compute.equal(table.column("key"), "syn00000003")).to_pylist()[0]
    assert row["caption"] == list(synthetic.generate(4))[3].caption and row["url"] == "http://x/syn00000003.jpg"


def test_embeddings_equal_open_clips_own_fp32_forward(embedded):
    """The default path (our decode + resize in the read tasks, uint8 transport, batched forward in the actor)
    gives, for every image, what open_clip's own eval transform + fp32 ``encode_image`` gives, one image at a time,
    within 1e-5: a different resize, normalisation, colour order or precision, or rows landing on the wrong key,
    would not."""
    import open_clip
    import torch
    from PIL import Image

    cfg, _ = embedded
    enc = load_encoder(EncoderConfig())
    spec = enc.spec
    transform = open_clip.image_transform(spec.size, is_train=False, mean=spec.mean, std=spec.std,
                                          interpolation=spec.interpolation, resize_mode=spec.resize_mode)
    table = pq.read_table(storage.join(cfg.table_uri, "part-00000.parquet"))
    got = dict(zip(table.column("key").to_pylist(), table.column("image_embedding").to_pylist(), strict=True))
    samples = good_samples(10, 0)
    assert set(got) == {k for k, _ in samples}
    with torch.inference_mode():
        for key, files in samples:
            x = transform(Image.open(io.BytesIO(files["jpg"])).convert("RGB"))[None]
            want = enc.model.float().encode_image(x)[0].numpy()
            np.testing.assert_allclose(np.asarray(got[key], dtype=np.float32), want, rtol=0, atol=1e-5,
                                       err_msg=key)


def test_bad_samples_land_in_errors_table(embedded):
    cfg, result = embedded
    errors = pq.read_table(storage.join(cfg.meta_uri, "errors")).to_pylist()
    by_key = {e["key"]: e for e in errors}
    assert set(by_key) == {"bad-corrupt", "bad-text", "bad-noimage", "bad-truncated", "dl-fail"}
    assert result.errors == 5
    assert by_key["dl-fail"]["stage"] == "download" and "404" in by_key["dl-fail"]["error"]
    assert "not an image" in by_key["bad-text"]["error"] and by_key["bad-text"]["source"] == "00000.tar/bad-text.png"
    assert "no image file" in by_key["bad-noimage"]["error"]
    assert "unreadable shard" in result.failed[next(iter(result.failed))]
    assert all(e["stage"] in ("decode", "download") for e in errors)


def test_rerun_writes_nothing_and_retries_only_the_unreadable_shard(embedded):
    cfg, _ = embedded
    fs, path = uris.filesystem(cfg.table_uri)
    before = {p: fs.info(p).get("ETag") for p in fs.find(path)}
    again = run_embed(cfg)
    assert (again.written, again.skipped, again.rows, again.exit_code) == (0, 3, 0, 4)
    assert [u.rsplit("/", 1)[-1] for u in again.failed] == ["00002.tar"]
    fs.invalidate_cache()
    assert {p: fs.info(p).get("ETag") for p in fs.find(path)} == before


def test_resume_redoes_only_missing_shards_float16(shards, ray_cluster, tmp_path):
    cfg = _cfg(shards, tmp_path, dtype="float16")
    first = run_embed(cfg)
    part1 = storage.join(cfg.table_uri, "part-00001.parquet")
    kept = uris.filesystem(part1)[0].info(part1)["mtime"]
    uris.filesystem(cfg.table_uri)[0].rm(storage.join(cfg.table_uri, "part-00000.parquet"))
    (tmp_path / "embeddings/unit/tiny/_tmp.deadbeef.part-00000.parquet").write_bytes(b"half a file")
    second = run_embed(cfg)
    assert (second.written, second.rows) == (1, 10) and first.rows == 18
    assert uris.filesystem(part1)[0].info(part1)["mtime"] == kept
    table = pq.read_table(str(tmp_path / "embeddings/unit/tiny"))
    assert table.num_rows == 18 and len(set(table.column("key").to_pylist())) == 18
    assert table.schema.field("image_embedding").type == pa.list_(pa.float16(), 128)
    assert not list((tmp_path / "embeddings/unit/tiny").glob("_tmp.*"))  # stale temporaries removed


def test_truncated_shard_is_not_done_until_repaired_then_arrives_whole(ray_cluster, tmp_path):
    """A truncated shard is not committed (not even as an empty part), so the repaired shard arrives whole."""
    raw, good = tmp_path / "raw", tmp_path / "good-00001.tar"
    raw.mkdir()
    write_shard(raw / "00000.tar", good_samples(3, 0))
    write_shard(good, good_samples(4, 3))
    (raw / "00001.tar").write_bytes(good.read_bytes()[:3000])  # a half-copied shard
    cfg = _cfg(raw, tmp_path / "out")
    first = run_embed(cfg)
    assert (first.rows, first.exit_code, [u.rsplit("/", 1)[-1] for u in first.failed]) == (3, 4, ["00001.tar"])
    assert not uris.exists(storage.join(cfg.table_uri, "part-00001.parquet"))
    assert not storage.list_files(storage.join(cfg.meta_uri, "empty"), ".json")
    (raw / "00001.tar").write_bytes(good.read_bytes())  # repaired
    second = run_embed(cfg)
    assert (second.written, second.skipped, second.rows, second.failed, second.exit_code) == (1, 1, 4, {}, 0)
    keys = pq.read_table(str(tmp_path / "out/embeddings/unit/tiny")).column("key").to_pylist()
    assert sorted(keys) == [f"syn{i:08d}" for i in range(7)]


def test_job_level_faults_fail_before_work(shards, tmp_path, s3_server):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="unknown CLIP model name 'ViT-Nope'"):
        run_embed(_cfg(shards, out, encoder=EncoderConfig(model_name="ViT-Nope")))
    with pytest.raises(FileNotFoundError, match="no webdataset shards"):
        run_embed(_cfg(tmp_path / "empty", out))
    captions_only = tmp_path / "captions_only"
    captions_only.mkdir()
    write_shard(captions_only / "00000.tar", [("a", {"txt": b"x", "json": b"{}"})])
    with pytest.raises(ValueError, match="no image column"):
        run_embed(_cfg(captions_only, out))
    images_only = tmp_path / "images_only"
    images_only.mkdir()
    write_shard(images_only / "00000.tar", [("a", {"jpg": good_samples(1, 0)[0][1]["jpg"]})])
    with pytest.raises(ValueError, match="needs captions"):
        run_embed(_cfg(images_only, out, text_embeddings=True))
    with pytest.raises(OSError, match="not writable"):
        run_embed(_cfg(shards, "s3://no-such-bucket-clipcap/x"))
    assert not out.exists()


def _rows(shard, keys, total, start=0):
    """Embedded rows of one shard as the actors return them (member indices from ``start``)."""
    n = len(keys)
    return pa.table({st.SHARD: [shard] * n, st.INDEX: pa.array(range(start, start + n), pa.int64()),
                     st.TOTAL: pa.array([total] * n, pa.int64()), st.KEY: keys, st.CAPTION: ["c"] * n,
                     st.URL: pa.array([None] * n, pa.string()), st.SOURCE: keys, st.ERROR: [""] * n,
                     st.UNREAD: [False] * n, "embedding": [np.ones(4, np.float32).tobytes()] * n})


def test_shard_committer_commits_complete_shards_and_duplicate_keys_become_errors(tmp_path):
    cfg = EmbedConfig(input=str(tmp_path), output_root=str(tmp_path / "out"), dataset="d")
    committer = ShardCommitter(cfg, [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], 4)
    assert committer.add(_rows("a", ["k2", "k1"], 3)) == []
    assert committer.add(_rows("a", ["k1"], 3, start=2)) == [(2, 1)]  # 2 rows, 1 error row
    table = pq.read_table(storage.join(cfg.table_uri, "part-a.parquet"))
    assert table.column("key").to_pylist() == ["k1", "k2"]
    errs = pq.read_table(storage.join(cfg.meta_uri, "errors", "part-a.parquet")).to_pylist()
    assert [(e["key"], e["stage"], e["error"]) for e in errs] == [("k1", "embed", "duplicate key in shard")]
    assert committer.pending() == []
    with pytest.raises(RuntimeError, match="expected 1"):
        committer.add(_rows("b", ["x", "y"], 1))


def test_a_retried_block_does_not_duplicate_rows(tmp_path):
    """Decode -> ClipActor -> ShardCommitter in-process: Ray re-running a task sends its rows again; every row
    carries its member index in the shard, so the copy is dropped instead of becoming rows (or 'duplicate key'
    errors, or a shard that looks over-full)."""
    from clipcap_core.encoders import preprocess_spec
    from clipcap_core.imaging import ImageResizer
    from pipelines.clip_actor import ClipActor

    write_shard(tmp_path / "00000.tar", good_samples(5, 0))
    uri = str(tmp_path / "00000.tar")
    decoded = list(st.iter_shard_batches(uri, ImageResizer(preprocess_spec(EncoderConfig())), batch_rows=2))
    assert [b.column(st.INDEX).to_pylist() for b in decoded] == [[0, 1], [2, 3], [4]]
    actor = ClipActor(EncoderConfig(), threads=1, texts=True)
    first, second, third = (actor(b) for b in decoded)
    cfg = _cfg(tmp_path, tmp_path / "out", text_embeddings=True)
    committer = ShardCommitter(cfg, [uri], 128)
    assert [committer.add(b) for b in (first, second, first, third)] == [[], [], [], [(5, 0)]]
    table = pq.read_table(storage.join(cfg.table_uri, "part-00000.parquet"))
    assert table.column("key").to_pylist() == [f"syn{i:08d}" for i in range(5)]
    assert not uris.exists(storage.join(cfg.meta_uri, "errors", "part-00000.parquet"))
    assert committer.finish("embedding", committer.uris) == [] and committer.committed == ["00000"]


def test_part_files_and_empty_markers_count_as_done(tmp_path):
    cfg = EmbedConfig(input=str(tmp_path / "raw"), output_root=str(tmp_path / "out"), dataset="d")
    shards = [str(tmp_path / "raw" / f"{i:05d}.tar") for i in range(4)]
    storage.atomic_write_table(pa.table({"key": ["x"]}), storage.join(cfg.table_uri, "part-00000.parquet"))
    storage.write_json({"rows": 0}, storage.join(cfg.meta_uri, "empty", "part-00002.json"))
    assert [u.rsplit("/", 1)[-1] for u in pending_shards(cfg, shards)] == ["00001.tar", "00003.tar"]


def test_shard_reader_refuses_unsafe_members_like_the_caption_readers():
    """The embed (and embed-text) shard reader applies the member checks of ``sources``: a link, a ``..`` name
    or an oversized member becomes its sample's error row."""
    from pipelines.embed.stages import decode_sample, read_shard
    from pipelines.io.sources import SourceConfig

    good = next(iter(synthetic.generate(1, seed=0, size=32)))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("ok.jpg", _jpeg(good.image))
        add("ok.txt", b"a caption")
        add("../../evil.jpg", _jpeg(good.image))
        link = tarfile.TarInfo("linked.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        add("big.jpg", b"x" * 5000)
        add("ok.json", b"{}")  # a duplicate-free second member of the good sample
    samples = {s.key: s for s in read_shard(buf.getvalue(), SourceConfig(max_member_bytes=4096))}
    assert samples["ok"].refused == "" and set(samples["ok"].files) == {"jpg", "txt", "json"}
    assert "'..'" in samples["../../evil"].refused and not samples["../../evil"].files
    assert "link" in samples["linked"].refused
    assert "too large" in samples["big"].refused and not samples["big"].files
    from clipcap_core.encoders import preprocess_spec
    from clipcap_core.imaging import ImageResizer

    resizer = ImageResizer(preprocess_spec(EncoderConfig(model_name="tiny")))
    rows = {k: decode_sample(s, resizer, "00000") for k, s in samples.items()}
    assert rows["ok"].error == "" and rows["ok"].pixels is not None
    assert all(rows[k].error and rows[k].pixels is None for k in ("../../evil", "linked", "big"))


def test_an_unreachable_hub_is_one_line_and_exit_2_before_any_actor_or_folder(tmp_path):
    import os
    import subprocess
    import sys

    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "00000.tar", good_samples(2, 0))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}  # no hub here; offline makes the miss immediate
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "embed", "--input", str(shards), "--output",
                          str(tmp_path / "out"), "--dataset", "d", "--clip", "ViT-B-32", "--clip-pretrained", "openai"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot fetch the CLIP weights ViT-B-32/openai from the model hub" in lines[0]
    assert not (tmp_path / "out").exists()
