"""`clipcap demo` (what `make demo` runs): the embedded default leaves an embeddings table whose row count
equals the successfully downloaded samples, says that it ran the tiny preset, and hands its paths on."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from pipelines.io import schemas, storage

pytestmark = pytest.mark.integration


def test_demo_embeds_every_downloaded_sample(ray_cluster, tmp_path, capsys, monkeypatch):
    from pipelines.cli import main
    from pipelines.demo import run as demo

    seen: list[demo.DemoResult] = []
    monkeypatch.setattr(demo, "STEPS", [demo.step_embed, lambda cfg, result: seen.append(result)])  # a later step
    assert main(["demo", "--samples", "24", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "--clip-pretrained" in out  # says it is the tiny preset, and how to switch
    table_uri = str(tmp_path / "embeddings" / "synthetic" / "tiny")
    table = pq.read_table(table_uri)
    stats = [storage.read_json(u) for u in storage.list_files(str(tmp_path / "raw" / "synthetic"), "_stats.json")]
    assert table.num_rows == sum(s["successes"] for s in stats) == 24
    assert schemas.validate_embedding_schema(table.schema) == 128
    (result,) = seen
    assert result.embeddings_uri == table_uri and result.raw_uri == str(tmp_path / "raw" / "synthetic")
    assert result.url_list == str(tmp_path / "synthetic" / "captions.tsv")
    assert result.summaries["embed"]["embed"]["rows"] == 24
