"""No secrets at rest or in logs: a download + embed + caption run on signed URLs (query
strings with a signature, credential and session token, plus a URL with user:password@) leaves none of the
secret values in any output file (Parquet read back as values, tar members, JSON) or in the logs at DEBUG."""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipcap_core import synthetic
from clipcap_core.encoders import EncoderConfig
from pipelines.caption.job import CaptionConfig, ResourceOptions, caption_archive
from pipelines.download.job import DownloadConfig, run_download
from pipelines.embed.job import EmbedConfig, EmbedResources, run_embed
from pipelines.io.sources import SourceConfig
from pipelines.io.urlsafety import PROJECT_LOGGERS, setup_logging

pytestmark = pytest.mark.integration
SECRETS = ("SIGdeadbeef0123456789", "AKIATESTSECRETKEY77", "TOKENsessionFQoG99", "hunter2pw")


def _signed(url: str, i: int) -> str:
    query = (f"X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={SECRETS[1]}%2F20261201&"
             f"X-Amz-Security-Token={SECRETS[2]}&X-Amz-Signature={SECRETS[0]}{i}")
    return f"{url}?{query}"


def _texts(path: Path) -> list[str]:
    """What a reader of ``path`` would see: Parquet values, tar member contents, or the raw text."""
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        return [json.dumps(table.to_pylist(), default=str), json.dumps(
            {k.decode(errors="replace"): v.decode(errors="replace") for k, v in (table.schema.metadata or {}).items()})]
    if path.suffix == ".tar":
        with tarfile.open(path) as tf:
            return [tf.extractfile(m).read().decode("latin-1") for m in tf if m.isfile()]
    return [path.read_bytes().decode("latin-1")]


@pytest.fixture()
def ray_local():
    """The session's Ray if one is connected, else a small local instance without a dashboard (the dashboard
    is what fails to start first on an overloaded machine)."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_signed_urls_leave_no_secret_in_outputs_or_logs(http_server, ray_local, tmp_path, caplog, capfd):
    folder = http_server.root / f"signed-{tmp_path.name[-12:]}"
    tsv = synthetic.write_url_list(folder, 12, f"{http_server.base_url}/{folder.name}", seed=5)
    rows = [line.split("\t") for line in tsv.read_text().splitlines()]
    host = http_server.base_url.split("://", 1)[1]
    lines = [f"{cap}\t{_signed(url, i)}" for i, (cap, url) in enumerate(rows)]
    tsv.write_text("\n".join(lines) + "\n")
    # Credentials in a URL: only in the caption input (a fetch error row must not echo them).
    lines[0] = lines[0].replace(f"http://{host}", f"http://user:{SECRETS[3]}@{host}")
    out = tmp_path / "out"
    try:
        setup_logging(verbose=True)
        caplog.set_level(logging.DEBUG)
        run_download(DownloadConfig(url_list=str(tsv), output=str(out / "raw"), header=False, image_size=32,
                                    resize_mode="no", encode_format="png", number_sample_per_shard=8,
                                    thread_count=2, allow_private_urls=True))
        run_embed(EmbedConfig(input=str(out / "raw"), output_root=str(out), dataset="s",
                              encoder=EncoderConfig(model_name="tiny"),
                              resources=EmbedResources(batch_size=8, torch_threads=1, cpus_per_actor=0.5,
                                                       decode_cpus=0.25, decode_memory_mb=256)))
        urls = pa.table({"key": [f"k{i}" for i in range(len(lines))],
                         "url": [line.split("\t")[1] for line in lines]})
        pq.write_table(urls, tmp_path / "urls.parquet")
        caption_archive(CaptionConfig(input=str(tmp_path / "urls.parquet"), output=str(out / "captions"),
                                      model="tiny", allow_untrained=True,
                                      source=SourceConfig(part_size=8, allow_private_urls=True),
                                      resources=ResourceOptions(clip_batch_size=4, caption_batch_size=4,
                                                                decode_block_rows=4, read_cpus=0.25,
                                                                cpus_per_actor=0.5)))
    finally:
        for name in PROJECT_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
    files = [p for p in out.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {".tar", ".parquet", ".json"} <= kinds, kinds
    # The run did fetch through the signed URLs (so the secrets were really there to leak).
    embedded = [u for p in (out / "embeddings").rglob("part-*.parquet") for u in pq.read_table(p).column("url").to_pylist()]
    assert len(embedded) >= 10 and all("?redacted-" in u for u in embedded)
    captions = list((out / "captions" / "captions").glob("part-*.parquet"))  # <output>/captions/ beside _meta/
    assert sum(pq.read_table(p).num_rows for p in captions) >= 10
    logs = caplog.text + "".join(capfd.readouterr())
    # the project's logs were captured (whichever handler formatted them: pytest's, or a Ray-format handler on
    # stderr when an earlier test's Ray session configured logging), so the check below counts
    assert "pipelines.download.job" in logs or "downloaded 12/12 samples" in logs, logs[-2000:]
    leaks = [(str(p.relative_to(out)), s) for p in files for t in _texts(p) for s in SECRETS if s in t]
    leaks += [("logs", s) for s in SECRETS if s in logs]
    assert leaks == []
