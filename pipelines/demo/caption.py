"""The bulk-captioning step of ``clipcap demo``: held-out synthetic images -> archive -> caption table."""

from __future__ import annotations

import io
import logging
import tarfile
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clipcap_core import uris
from pipelines.caption.job import CaptionConfig, ResourceOptions, caption_archive
from pipelines.caption.output import table_uri
from pipelines.io import schemas, storage

log = logging.getLogger(__name__)
ARCHIVE = "heldout.tar"
Accuracy = Callable[[list[str], list[str]], dict[str, dict[str, float]]]


def write_archive(uri: str, samples: Sequence[Any]) -> None:
    """A tar of ``<key>.png`` members at ``uri`` (any fsspec URI)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for s in samples:
            png = io.BytesIO()
            s.image.save(png, format="PNG")
            info = tarfile.TarInfo(f"{s.key}.png")
            info.size = png.tell()
            png.seek(0)
            tf.addfile(info, png)
    fs, path = uris.filesystem(uri)
    storage.ensure_dir(fs, path.rsplit("/", 1)[0])
    with fs.open(path, "wb") as f:
        f.write(buf.getvalue())


def read_captions(output: str) -> pa.Table:
    """All committed caption parts of an output, concatenated (metadata dropped)."""
    tables = []
    for uri in storage.list_files(table_uri(output), ".parquet"):
        fs, path = uris.filesystem(uri)
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f).replace_schema_metadata(None))
    return pa.concat_tables(tables) if tables else schemas.CAPTIONS_SCORED_SCHEMA.empty_table()


def _norm(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


def caption_heldout(root: str, model_uri: str, samples: Sequence[Any], *, show: int = 5,
                    resources: ResourceOptions | None = None, echo: Callable[[str], None] = print,
                    name: str = "heldout", projection: Any = None, accuracy: Accuracy | None = None
                    ) -> dict[str, Any]:
    """Caption held-out synthetic samples through the bulk pipeline into ``<root>/captions/<name>``; print a few
    next to the truth. ``projection``: a ``decap.ProjectionConfig`` (default: the model's own). ``accuracy``
    (``worlds.World.accuracy``): exact match is its (any wording of the same scene), printed per attribute."""
    archive = storage.join(root, "archives", ARCHIVE)
    output = storage.join(root, "captions", name)
    write_archive(archive, samples)
    extra = {"projection": projection} if projection is not None else {}
    summary = caption_archive(CaptionConfig(input=archive, output=output, model=model_uri, overwrite=True,
                                            resources=resources or ResourceOptions(), **extra))
    table = read_captions(output).to_pylist()
    predicted = {r[schemas.KEY]: r[schemas.CAPTION] for r in table if r[schemas.RANK] == 0}
    truth = {f"{ARCHIVE}/{s.key}.png": s.caption for s in samples}
    hits = sum(_norm(predicted.get(k, "")) == _norm(v) for k, v in truth.items())
    echo(f"captioned {summary.images} held-out images from {archive} into {output} "
         f"({summary.errors} errors, {summary.images_per_s:.1f} images/s incl. start-up)")
    for key in sorted(truth)[:show]:
        mark = "ok " if _norm(predicted.get(key, "")) == _norm(truth[key]) else "   "
        echo(f"  {mark} true: {truth[key]:<40s} model: {predicted.get(key, '<no caption>')}")
    echo(f"exact match on held-out images: {hits}/{len(truth)}")
    out = {"archive": archive, "output": output, "images": summary.images, "errors": summary.errors,
           "exact_match": hits / max(1, len(truth)), "summary": summary.as_dict()}
    if accuracy is not None:
        keys = sorted(truth)
        scores = accuracy([predicted.get(k, "") for k in keys], [truth[k] for k in keys])
        out.update(exact_match=scores["accuracy"]["exact"], accuracy=scores)
        echo("held-out accuracy, any wording (chance in brackets): " + ", ".join(
            f"{k} {100 * v:.0f}% ({100 * scores['chance'][k]:.2g}%)" for k, v in scores["accuracy"].items()))
    return out
