"""Stopping part-way: a table folder never holds a half-written or temporary file, whatever stops the writer."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from clipcap_core.decoding import DecodeConfig
from pipelines.caption.output import PartCommitter, _remove_stale_temporaries, meta_uri, table_uri
from pipelines.embed import output as embed_output
from pipelines.embed import stages as st
from pipelines.embed.job import EmbedConfig
from pipelines.io import storage
from tests.pipelines.test_caption_reliability import _rows


def _temporaries(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("_tmp.*")]


def _watch(monkeypatch: pytest.MonkeyPatch, folder: Path) -> list[list[str]]:
    """What ``folder`` holds each time a Parquet file has just been written (before its rename)."""
    seen: list[list[str]] = []
    real = storage.pq.write_table

    def write(table, where, **kw):
        real(table, where, **kw)
        seen.append(sorted(os.listdir(folder)) if folder.is_dir() else [])

    monkeypatch.setattr(storage.pq, "write_table", write)
    return seen


# --- temporaries live outside the table folder ----------------------------------------------------------------
def test_a_caption_part_being_written_is_never_in_the_table_folder(tmp_path, monkeypatch):
    out = tmp_path / "out"
    seen = _watch(monkeypatch, out / "captions")
    c = PartCommitter(str(out), "m@1", DecodeConfig())
    c.add(_rows("p0", [(0, "a.jpg", "one", None, None), (1, "b.jpg", None, "bad", "decode")], 2))
    c.add(_rows("p1", [(0, "c.jpg", "two", None, None)], 1))
    assert seen == [[], [], ["part-p0.parquet"]]  # p0's errors file, p0's part file, p1's part file
    assert sorted(os.listdir(out / "captions")) == ["part-p0.parquet", "part-p1.parquet"]
    assert _temporaries(out) == []


def test_an_embedding_shard_being_written_is_never_in_the_table_folder(tmp_path, monkeypatch):
    cfg = EmbedConfig(input=str(tmp_path / "in"), output_root=str(tmp_path / "out"), dataset="d")
    table = Path(cfg.table_uri)
    seen = _watch(monkeypatch, table)
    cols = {st.KEY: np.array(["k0", "k1"], dtype=object), st.CAPTION: np.array(["a", "b"], dtype=object),
            st.URL: np.array([None, None], dtype=object), st.SOURCE: np.array(["s0", "s1"], dtype=object),
            st.ERROR: np.array([None, "bad image"], dtype=object), "image_embedding": np.ones((2, 4), np.float32)}
    embed_output.commit_shard(cfg, str(tmp_path / "in" / "00000.tar"), cols, 4)
    assert seen == [[], []] and os.listdir(table) == ["part-00000.parquet"]  # errors file, then part file
    assert _temporaries(tmp_path / "out") == []


def test_stale_temporaries_of_a_killed_run_are_removed_from_the_tmp_folders(tmp_path):
    out, cfg = tmp_path / "out", EmbedConfig(input="in", output_root=str(tmp_path / "emb"), dataset="d")
    for stale in (Path(meta_uri(str(out), "tmp")) / "_tmp.dead.part-p9.parquet",
                  Path(table_uri(str(out))) / "_tmp.old.part-p8.parquet",
                  Path(embed_output.tmp_uri(cfg.meta_uri)) / "_tmp.dead.part-00009.parquet"):
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_bytes(b"")
    _remove_stale_temporaries(str(out))
    assert embed_output.remove_stale_temporaries(cfg.table_uri, cfg.meta_uri) == 1
    assert _temporaries(tmp_path) == []
