"""pipelines.io.schemas: embedding / errors schemas and Parquet metadata."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.io import schemas


def test_embedding_schema_types():
    s = schemas.embedding_schema(512, "float16", with_text=True)
    assert s.names == ["key", "caption", "url", "image_embedding", "text_embedding"]
    assert s.field("image_embedding").type == pa.list_(pa.float16(), 512)
    assert not s.field("key").nullable and s.field("caption").nullable
    assert schemas.validate_embedding_schema(s) == 512
    with pytest.raises(ValueError, match="dtype"):
        schemas.embedding_type(8, "bfloat16")


def test_validate_rejects_wrong_tables():
    with pytest.raises(ValueError, match="missing column"):
        schemas.validate_embedding_schema(pa.schema([("key", pa.string())]))
    with pytest.raises(ValueError, match="fixed_size_list"):
        schemas.validate_embedding_schema(pa.schema([("key", pa.string()), ("image_embedding", pa.list_(pa.float32()))]))


def test_metadata_round_trip_through_parquet(tmp_path):
    meta = schemas.embedding_metadata(clip_model="ViT-B-32", clip_pretrained="openai", dim=4, dtype="float32",
                                      preprocess="resize=shortest", source_shard="s3://b/raw/00000.tar")
    schema = schemas.with_metadata(schemas.embedding_schema(4), meta)
    flat = pa.array([0.0, 1.0, 2.0, 3.0], pa.float32())
    table = pa.Table.from_arrays([pa.array(["k"]), pa.array([None], pa.string()), pa.array([None], pa.string()),
                                  pa.FixedSizeListArray.from_arrays(flat, 4)], schema=schema)
    pq.write_table(table, tmp_path / "t.parquet")
    back = schemas.read_metadata(pq.read_schema(tmp_path / "t.parquet"))
    assert back == meta and back[schemas.META_SCHEMA_VERSION] == schemas.SCHEMA_VERSION
    assert schemas.to_json({"b": 1, "a": 2}) == '{"a": 2, "b": 1}'


def test_errors_and_captions_schemas():
    assert schemas.ERRORS_SCHEMA.names == ["key", "source", "stage", "error"]
    assert schemas.CAPTIONS_SCHEMA.field("created_at").type == pa.timestamp("us", tz="UTC")
