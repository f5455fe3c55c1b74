"""No secrets at rest or in logs, and the fetch policy for URLs from user data."""

from __future__ import annotations

import http.server
import json
import logging
import threading
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.download.job import DownloadConfig, prepare_download
from pipelines.io import storage, urlsafety
from pipelines.io.sources import SourceConfig, fetch_url, scan_input

SIG = "X-Amz-Signature=0f1e2d3c4b5a69788796a5b4c3d2e1f0"
CRED = "X-Amz-Credential=AKIAEXAMPLESECRET12%2F20261201"
SIGNED = f"https://bucket.s3.amazonaws.com/img/cat.jpg?{CRED}&{SIG}&X-Amz-Security-Token=FQoGZXIvYXdzEXAMPLE"


def test_redact_url_drops_query_and_credentials_but_keeps_objects_apart():
    red = urlsafety.redact_url(SIGNED)
    assert red.startswith("https://bucket.s3.amazonaws.com/img/cat.jpg?redacted-")
    assert "AKIA" not in red and "0f1e2d" not in red and "FQoG" not in red
    other = urlsafety.redact_url(SIGNED.replace("0f1e", "ffff"))
    assert other != red  # two different signatures stay distinguishable (hash), neither is kept
    assert urlsafety.redact_url("https://user:hunter2@host/x.png") .startswith("https://host/x.png?redacted-")
    assert urlsafety.redact_url("s3://bucket/key.png") == "s3://bucket/key.png"
    text = f"download failed: HTTPError 403 for {SIGNED} (retry)"
    assert urlsafety.redact_text(text).endswith(" (retry)") and "Signature" not in urlsafety.redact_text(text)


def test_tables_and_json_written_through_storage_hold_no_signed_url(tmp_path):
    table = pa.table({"key": ["a"], "url": [SIGNED], "source": [SIGNED], "error": [f"404 at {SIGNED}"],
                      "caption": ["a cat"]})
    storage.atomic_write_table(table, str(tmp_path / "part-0.parquet"))
    storage.write_json({"input": SIGNED, "nested": [{"u": SIGNED}]}, str(tmp_path / "_run.json"))
    stored = pq.read_table(tmp_path / "part-0.parquet").to_pylist()[0]
    assert stored["key"] == "a" and stored["caption"] == "a cat"
    assert stored["url"] == urlsafety.redact_url(SIGNED)
    for path in tmp_path.iterdir():
        raw = path.read_bytes()
        assert b"AKIAEXAMPLE" not in raw and b"0f1e2d3c" not in raw and b"FQoGZX" not in raw, path.name
    assert json.loads((tmp_path / "_run.json").read_text())["input"] == urlsafety.redact_url(SIGNED)


def test_verbose_logging_raises_only_project_loggers_and_redacts_urls(caplog):
    root_level = logging.getLogger().level
    try:
        urlsafety.setup_logging(verbose=True)
        assert logging.getLogger("pipelines.caption.job").getEffectiveLevel() == logging.DEBUG
        assert logging.getLogger("botocore.credentials").getEffectiveLevel() > logging.DEBUG
        urlsafety.install_log_redaction()  # caplog's handler is on the root logger now
        with caplog.at_level(logging.INFO, logger="pipelines.download.job"):
            logging.getLogger("pipelines.download.job").info("fetching %s", SIGNED)
        assert "cat.jpg?redacted-" in caplog.text and "AKIAEXAMPLE" not in caplog.text
    finally:
        for name in urlsafety.PROJECT_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
        logging.getLogger().setLevel(root_level)


@pytest.mark.integration
def test_url_inputs_refuse_loopback_unless_opted_in(http_server):
    (http_server.root / "ok.bin").write_bytes(b"12345")
    url = f"{http_server.base_url}/ok.bin"
    with pytest.raises(ValueError, match="non-public address"):
        fetch_url(url, SourceConfig())
    assert fetch_url(url, SourceConfig(allow_private_urls=True)) == b"12345"
    with pytest.raises(ValueError, match="larger than 4 bytes"):
        fetch_url(url, SourceConfig(allow_private_urls=True, max_member_bytes=4))


def test_object_store_urls_in_user_data_need_an_opt_in():
    with pytest.raises(ValueError, match="allow-object-store-urls"):
        fetch_url("s3://clipcap/secret/weights.pt", SourceConfig())
    with pytest.raises(ValueError, match="not allowed"):
        fetch_url("file:///etc/passwd", SourceConfig(allow_private_urls=True, allow_object_store_urls=True))


class _Redirect(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - stdlib name
        self.send_response(302)
        self.send_header("Location", "http://169.254.169.254/latest/meta-data/iam/")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_redirects_are_checked_at_every_hop(monkeypatch):
    """A (public-looking) server redirects to the cloud metadata address: refused before connecting there."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    real = urlsafety.check_host
    # Treat the test server as public, so only the redirect target can trip the check.
    monkeypatch.setattr(urlsafety, "check_host", lambda h, a: None if h == "127.0.0.1" else real(h, a))
    try:
        with pytest.raises(ValueError, match=r"169\.254\.169\.254"):
            fetch_url(f"http://127.0.0.1:{srv.server_address[1]}/x", SourceConfig(fetch_timeout_s=3))
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("url,match", [("file:///etc/passwd", "only http"), ("s3://bucket/k.jpg", "only http"),
                                       ("http://10.1.2.3/x.jpg", "private"), ("http://localhost:8000/x.jpg", "private")])
def test_download_lists_with_local_or_private_urls_fail_before_any_work(tmp_path, url, match):
    tsv = tmp_path / "list.tsv"
    tsv.write_text(f"a cat\thttps://example.com/cat.jpg\na dog\t{url}\n")
    with pytest.raises(ValueError, match=match):
        prepare_download(DownloadConfig(url_list=str(tsv), output=str(tmp_path / "out"), header=False))
    assert not (tmp_path / "out").exists()
    if "10.1.2.3" in url or "localhost" in url:
        prepare_download(DownloadConfig(url_list=str(tsv), output=str(tmp_path / "out"), header=False,
                                        allow_private_urls=True))


@pytest.mark.integration
def test_http_inputs_keep_their_url(http_server):
    """``storage.full_uri`` keeps an http URL as it is (not ``http://http://host/x``), so HTTP inputs are read."""
    (http_server.root / "in.png").write_bytes(b"\x89PNG")
    url = f"{http_server.base_url}/in.png"
    files = scan_input(url).files
    assert [f.uri for f in files] == [url]
    with urllib.request.urlopen(files[0].uri, timeout=5) as r:
        assert r.read() == b"\x89PNG"


def test_img2dataset_shards_are_rewritten_without_signed_urls_once(tmp_path):
    import io
    import tarfile

    from pipelines.download.job import redact_shards

    members = {"000000000.png": b"\x89PNG-bytes", "000000000.json": json.dumps({"url": SIGNED, "key": "0"}).encode(),
               "000000000.txt": b"a cat"}
    with tarfile.open(tmp_path / "00000.tar", "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"key": ["000000000", "000000001"], "url": [SIGNED, "https://plain.example/x.jpg"],
                             "status": ["success", "failed_to_download"]}), tmp_path / "00000.parquet")
    pq.write_table(pa.table({"key": ["1"], "url": ["https://plain.example/y.jpg"]}), tmp_path / "00001.parquet")
    before = (tmp_path / "00001.parquet").stat().st_mtime_ns
    assert redact_shards(str(tmp_path)) == 1
    with tarfile.open(tmp_path / "00000.tar") as tf:
        got = {m.name: tf.extractfile(m).read() for m in tf}
    assert got["000000000.png"] == members["000000000.png"] and got["000000000.txt"] == b"a cat"
    assert json.loads(got["000000000.json"]) == {"url": urlsafety.redact_url(SIGNED), "key": "0"}
    table = pq.read_table(tmp_path / "00000.parquet").to_pylist()
    assert [r["url"] for r in table] == [urlsafety.redact_url(SIGNED), "https://plain.example/x.jpg"]
    assert table[1]["status"] == "failed_to_download"
    assert (tmp_path / "00001.parquet").stat().st_mtime_ns == before  # plain URLs: untouched
    assert redact_shards(str(tmp_path)) == 0  # nothing left to do on a rerun
