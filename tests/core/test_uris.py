"""Path-safe copies of remote model directories: a model URI from a shared bucket whose
listing holds ``..`` keys must not write outside the temp folder, and ``config.json`` cannot point the loader
at files outside the artifact."""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path

import boto3
import pytest

from clipcap_core.artifacts import load_model, save_model
from clipcap_core.uris import check_relative, local_copy, safe_join
from tests.core.core_helpers import one_thread, sharp_model  # noqa: F401


def _client(server):
    env = server.env()
    return boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])


@pytest.mark.integration
def test_traversal_key_in_remote_model_is_refused_and_writes_nothing(s3_server, tmp_path):
    model, tok = sharp_model()
    prefix = f"evil-{uuid.uuid4().hex[:8]}"
    save_model(model, tok, f"s3://clipcap/{prefix}/evilmodel")
    # A naive copy writes this key to <tempdir>/clipcap-XXXX/../<marker>/owned.txt, i.e. <tempdir>/<marker>/.
    marker = f"owned-{uuid.uuid4().hex[:8]}"
    key = f"{prefix}/evilmodel/../{marker}/owned.txt"
    _client(s3_server).put_object(Bucket="clipcap", Key=key, Body=b"owned")
    with pytest.raises(ValueError, match=r"unsafe file name '\.\./owned-"):
        load_model(f"s3://clipcap/{prefix}/evilmodel")
    assert not (Path(tempfile.gettempdir()) / marker).exists()


@pytest.mark.integration
def test_clean_remote_directory_copies_every_file(s3_server):
    prefix = f"ok-{uuid.uuid4().hex[:8]}"
    client = _client(s3_server)
    for key in ("a.txt", "sub/b.txt"):
        client.put_object(Bucket="clipcap", Key=f"{prefix}/m/{key}", Body=key.encode())
    with local_copy(f"s3://clipcap/{prefix}/m") as local:
        got = {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()}
    assert got == {"a.txt": b"a.txt", "sub/b.txt": b"sub/b.txt"}


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "C:/x", "c:x", "a\\..\\x", "", "a//b",
                                  "./a", "a/.", "a\x00b"])
def test_unsafe_relative_names_are_refused(name):
    with pytest.raises(ValueError, match="unsafe file name"):
        check_relative(name)


def test_symlinked_parent_cannot_lead_outside(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "link").symlink_to(tmp_path)  # a plain-looking name that resolves outside
    with pytest.raises(ValueError, match="resolves outside"):
        safe_join(base, "link/secret")
    assert safe_join(base, "sub/file") == base / "sub" / "file"


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("field", ["mapping", "tokenizer"])
def test_artifact_weight_paths_outside_the_artifact_are_refused(tmp_path, field):
    model, tok = sharp_model()
    out = tmp_path / "model"
    save_model(model, tok, str(out))
    # A copy of the real file outside the artifact: a loader that joins names blindly would read it.
    outside = tmp_path / "outside"
    outside.mkdir()
    meta = json.loads((out / "config.json").read_text())
    target = out / meta["weights"][field]
    (outside / target.name).symlink_to(target)
    meta["weights"][field] = f"../outside/{target.name}"
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"weights.{field}: refusing unsafe file name"):
        load_model(str(out))
