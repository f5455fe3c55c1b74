"""embed-text: caption corpora into parts (every input kind, bad rows), the text-tower core, tables; on the real
Ray cluster and S3 server: the CLI end to end, errors table, truncation counts, resume without duplicates, refusal
of changed input."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipcap_core import uris
from clipcap_core.encoders import EncoderConfig, load_encoder
from pipelines import rows
from pipelines.clip_actor import ClipActor
from pipelines.embed import stages as st
from pipelines.embed import text as embed_text
from pipelines.io import schemas, storage

LONG = " ".join(["red"] * 40)  # 40 tokens: more than the tiny CLIP's context of 32


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(EncoderConfig(model_name="tiny"))


def test_text_file_rows_and_bad_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"a small red circle at the top\r\n\n\xff\xfe broken\n" + LONG.encode() + b"\n" + b"y" * 50
                     + b"\n")
    parts = embed_text.plan_parts(str(path), part_size=3, max_chars=40)
    assert [p.part_id for p in parts] == ["corpus-00000", "corpus-00001"]
    rows = [(k, c, e) for p in parts for k, c, e in zip(p.keys, p.captions, p.errors, strict=True)]
    assert [r[0] for r in rows] == [f"corpus-{i:08d}" for i in range(5)]
    assert rows[0][1:] == ("a small red circle at the top", "")  # \r\n line ends are one line end
    assert rows[1][2] == "empty caption" and rows[2][1] is None and "not UTF-8" in rows[2][2]
    assert rows[3] == ("corpus-00000003", LONG, "caption longer than 40 characters (159)")
    assert rows[4][2] == "caption longer than 40 characters (50)"
    assert embed_text.plan_digest(parts) == embed_text.plan_digest(
        embed_text.plan_parts(str(path), part_size=3, max_chars=40))


def test_table_formats_columns_and_keys(tmp_path):
    df = pd.DataFrame({"id": ["b", "a", "c"], "text": ["two red squares", "", "one blue circle"]})
    df.to_csv(tmp_path / "c.csv", index=False)
    df.to_csv(tmp_path / "t.tsv", index=False, sep="\t")
    df.to_json(tmp_path / "j.jsonl", orient="records", lines=True)
    df.to_parquet(tmp_path / "p.parquet")
    for name in ("c.csv", "t.tsv", "j.jsonl", "p.parquet"):
        (part,) = embed_text.plan_parts(str(tmp_path / name), caption_col="text", key_col="id")
        assert part.keys == ["b", "a", "c"], name
        assert part.captions[0] == "two red squares" and part.errors == ["", "empty caption", ""], name
    (part,) = embed_text.plan_parts(str(tmp_path / "c.csv"), caption_col="text")
    assert part.keys == ["c-00000000", "c-00000001", "c-00000002"]
    with pytest.raises(ValueError, match=r"no column\(s\) \['caption'\]; it has \['id', 'text'\]"):
        embed_text.plan_parts(str(tmp_path / "c.csv"))
    with pytest.raises(ValueError, match="same part id 'c-00000'"):  # a folder: c.csv and c.tsv collide
        (tmp_path / "c.tsv").write_text((tmp_path / "t.tsv").read_text())
        embed_text.plan_parts(str(tmp_path), caption_col="text", key_col="id")
    (tmp_path / "notes.bin").write_text("x")
    with pytest.raises(ValueError, match="cannot tell the format"):
        embed_text.plan_parts(str(tmp_path / "notes.bin"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        embed_text.plan_parts(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.csv").write_bytes(b"id,text\na,one\nb,caf\xe9\n")
    with pytest.raises(ValueError, match=r"caption file '.*bad\.csv': line 3 is not UTF-8"):
        embed_text.plan_parts(str(tmp_path / "bad.csv"), caption_col="text")


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_img2dataset_shards_from_metadata_or_tar(tmp_path):
    (tmp_path / "00000.tar").write_bytes(_tar({"000000000.jpg": b"x"}))
    pq.write_table(pa.table({"key": ["000000000", "000000001"], "caption": ["a red circle", None],
                             "status": ["success", "failed_to_download"]}), tmp_path / "00000.parquet")
    (tmp_path / "00001.tar").write_bytes(_tar({"000010000.jpg": b"x", "000010000.txt": b"three blue squares",
                                               "000010001.jpg": b"x"}))
    parts = embed_text.plan_parts(str(tmp_path))
    assert [(p.part_id, p.keys, p.captions, p.errors) for p in parts] == [
        ("00000", ["000000000", "000000001"], ["a red circle", None], ["", "empty caption"]),
        ("00001", ["000010000", "000010001"], ["three blue squares", None], ["", "empty caption"])]


def test_text_tower_core_and_table(encoder):
    import torch

    part = embed_text.TextPart("p", "in.txt", ["k2", "k1", "k2", "k3"], ["two red squares", LONG, "dup", None],
                                 ["", "", "", "empty caption"])
    batch = embed_text.part_block(part)
    assert batch.column(st.INDEX).to_pylist() == [0, 1, 2, 3] and batch.column(st.TOTAL).to_pylist() == [4] * 4
    actor = ClipActor(EncoderConfig(model_name="tiny"), threads=1, images=False, texts=True, count_truncated=True)
    assert isinstance(actor.encoder.model.visual, torch.nn.Identity)  # text only: no image tower kept
    out = actor(batch)
    text = out.column(rows.TEXT_EMBEDDING).to_pylist()
    np.testing.assert_allclose(np.stack([np.frombuffer(t, np.float32) for t in text[:3]]),
                               encoder.encode_text(["two red squares", LONG, "dup"]), atol=1e-5)
    assert text[3] == b"" and out.column(st.TRUNCATED).to_pylist() == [False, True, False, False]
    assert rows.EMBEDDING not in out.column_names
    table, errs = embed_text.build_tables(out, encoder.dim, "float16", {"clipcap.dim": str(encoder.dim)})
    assert table.column("key").to_pylist() == ["k1", "k2"] and table.column("caption").to_pylist() == [LONG,
                                                                                                       "two red squares"]
    assert table.schema.field(schemas.TEXT_EMBEDDING).type == pa.list_(pa.float16(), encoder.dim)
    assert table.schema.metadata[b"clipcap.truncated"] == b"1"
    assert sorted((e["key"], e["error"]) for e in errs) == [("k2", "duplicate key in part"), ("k3", "empty caption")]


# --- on the real local Ray cluster and S3 server ------------------------------------------------------------
def _read(uri: str) -> pa.Table:
    fs, _ = uris.filesystem(uri)
    fs.invalidate_cache()
    parts = []
    for f in storage.list_files(uri, ".parquet"):
        with fs.open(uris.filesystem(f)[1], "rb") as fh:
            parts.append(pq.read_table(fh))
    return pa.concat_tables([p.replace_schema_metadata(None) for p in parts])


def _result(out: str) -> dict:
    return json.loads(out[out.index("\n{") + 1:])  # the summary line, then the result as JSON


@pytest.mark.integration
def test_cli_on_s3_resumes_without_duplicates(ray_cluster, s3_uri, encoder, capsys):
    from pipelines.cli import main

    captions = [f"{c} small red circle at the top" for c in ("a", "two", "three")] * 3 + ["", LONG]
    corpus = storage.join(s3_uri, "corpus.txt")
    fs, path = uris.filesystem(corpus)
    fs.pipe_file(path, ("\n".join(captions) + "\n").encode())
    args = ["embed-text", "--input", corpus, "--output", s3_uri, "--dataset", "corpus", "--part-size", "4",
            "--batch-size", "3", "--cpus-per-actor", "0.5"]
    assert main(args) == 0
    result = _result(capsys.readouterr().out)
    table_uri = storage.join(s3_uri, "text-embeddings/corpus/tiny")
    assert (result["table_uri"], result["parts"], result["written"]) == (table_uri, 3, 3)
    assert (result["rows"], result["errors"], result["truncated"]) == (10, 1, 1)
    table = _read(table_uri)
    assert sorted(table.column("key").to_pylist()) == [f"corpus-{i:08d}" for i in range(11) if i != 9]
    emb = np.stack(table.column(schemas.TEXT_EMBEDDING).to_pylist())
    np.testing.assert_allclose(emb, encoder.encode_text(table.column("caption").to_pylist()), atol=1e-4)
    errors = _read(storage.join(s3_uri, "_meta/text-embeddings/corpus/tiny/errors")).to_pylist()
    assert [(e["key"], e["error"]) for e in errors] == [("corpus-00000009", "empty caption")]
    meta = pq.read_schema(uris.filesystem(storage.join(table_uri, "part-corpus-00001.parquet"))[0].open(
        uris.filesystem(storage.join(table_uri, "part-corpus-00001.parquet"))[1], "rb")).metadata
    assert meta[b"clipcap.clip_model"] == b"tiny" and meta[b"clipcap.dim"] == b"128"

    # A run that died after two parts: the rerun embeds only the missing one, and no row twice.
    fs.rm(uris.filesystem(storage.join(table_uri, "part-corpus-00002.parquet"))[1])
    assert main(args) == 0
    again = _result(capsys.readouterr().out)
    assert (again["skipped"], again["written"], again["rows"], again["truncated"]) == (2, 1, 2, 1)
    rerun = _read(table_uri)
    assert sorted(rerun.column("key").to_pylist()) == sorted(table.column("key").to_pylist())
    # Changed input: refused before any work, the table untouched.
    fs.pipe_file(path, b"one new caption\n")
    assert main(args) == 2
    assert "other input or settings (changed: plan_digest)" in capsys.readouterr().err
    assert _read(table_uri).num_rows == 10
