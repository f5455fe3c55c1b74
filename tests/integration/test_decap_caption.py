"""Bulk captioning with a DeCap artifact on the real local Ray head and S3 server: the caption actors project
every image embedding onto the artifact's memory (loaded once per actor), for every strategy; projection flags
and their job-level checks."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipcap_core import synthetic, uris
from clipcap_core.artifacts import load_model, save_model
from clipcap_core.captioner import Captioner
from clipcap_core.decap import DecapMemory, ProjectionConfig
from clipcap_core.encoders import EncoderConfig, load_encoder
from pipelines.caption.job import prepare
from pipelines.cli import caption_config as config_from_args
from pipelines.cli import command_parser, main
from pipelines.demo.run import read_captions
from pipelines.io import storage

pytestmark = pytest.mark.integration
FLAGS = ["--part-size", "4", "--clip-batch-size", "4", "--caption-batch-size", "4", "--decode-block-rows", "4",
         "--read-cpus", "0.25", "--cpus-per-actor", "0.5"]


def _archive(uri: str, samples) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        members = [(f"{s.key}.png", s.image) for s in samples]
        for name, image in members:
            png = io.BytesIO()
            image.save(png, format="PNG")
            info = tarfile.TarInfo(name)
            info.size = png.tell()
            png.seek(0)
            tf.addfile(info, png)
        info = tarfile.TarInfo("broken.png")  # not an image: an error row, not a crash
        info.size = 5
        tf.addfile(info, io.BytesIO(b"\x89PNGx"))
    fs, path = uris.filesystem(uri)
    fs.pipe_file(path, buf.getvalue())


@pytest.fixture(scope="module")
def decap_artifact(s3_server, tmp_path_factory):
    """The tiny preset's decoder with a memory of tiny-CLIP text embeddings of synthetic captions, on S3."""
    import uuid

    loaded = load_model("tiny")
    encoder = load_encoder(EncoderConfig(model_name="tiny"))
    captions = [s.caption for s in synthetic.generate(64, seed=3)]
    uri = f"s3://clipcap/decap-artifact-{uuid.uuid4().hex[:8]}"
    save_model(loaded.model, loaded.tokenizer, uri, decap=DecapMemory.from_texts(encoder, captions))
    return uri


def test_bulk_job_projects_onto_the_artifact_memory(ray_cluster, s3_uri, decap_artifact, capsys):
    samples = list(synthetic.generate(6, seed=2, size=48, start=7000))
    archive = storage.join(s3_uri, "in", "images.tar")
    _archive(archive, samples)
    out = storage.join(s3_uri, "captions")
    assert main(["caption", "--input", archive, "--output", out, "--model", decap_artifact, "--strategy", "beam",
                 "--beam-size", "3", "--num-captions", "2", *FLAGS]) == 0
    rows = read_captions(out).to_pylist()
    got = {(r["key"], r["rank"]): r["caption"] for r in rows}

    images = [s.image for s in samples]
    projected = Captioner.from_pretrained(decap_artifact)
    raw = Captioner.from_pretrained(decap_artifact, projection=ProjectionConfig(mode="none"))
    emb = projected.embed_images(images)
    expect = projected.caption(embeddings=emb, strategy="beam", beam_size=3, n=2)
    assert expect != raw.caption(embeddings=emb, strategy="beam", beam_size=3, n=2)  # projecting matters here
    assert got == {(f"images.tar/{s.key}.png", rank): expect[i][rank] for i, s in enumerate(samples)
                   for rank in range(2)}
    err_files = storage.list_files(storage.join(out, "_meta", "errors"), ".parquet")
    errors = pa.concat_tables([pq.read_table(uris.filesystem(u)[1], filesystem=uris.filesystem(u)[0])
                               for u in err_files]).to_pylist() if err_files else []
    assert [e["key"] for e in errors] == ["images.tar/broken.png"]
    assert "projection" not in storage.read_json(storage.join(out, "_meta", "run.json"))  # default: the artifact's own


def test_projection_flags_reach_the_job_and_are_checked_first(s3_uri, tmp_path, capsys):
    mem16 = tmp_path / "mem16" / "part-00000.parquet"
    mem16.parent.mkdir()
    pq.write_table(pa.table({"key": ["a"], "text_embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(np.ones(16, np.float32)), 16)}), mem16)
    parser = command_parser("caption")
    args = parser.parse_args(["--input", "x", "--output", storage.join(s3_uri, "o"), "--model", "tiny",
                              "--allow-untrained", "--projection", "memory", "--memory", str(mem16.parent), "--tau", "0.05",
                              "--memory-size", "10"])
    cfg = config_from_args(args)
    assert cfg.projection == ProjectionConfig(mode="memory", memory=str(mem16.parent), tau=0.05, memory_size=10)
    with pytest.raises(ValueError, match="memory table .* has D=16 but the model expects clip_dim=128"):
        prepare(cfg)
    assert main(["caption", "--input", "x", "--output", storage.join(s3_uri, "o2"), "--model", "tiny",
                 "--allow-untrained", "--projection", "memory"]) == 2
    assert "needs a memory table" in capsys.readouterr().err
