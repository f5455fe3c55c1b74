"""Moving model files between any fsspec URI (local path, ``s3://``, ``gs://``, ``memory://``) and local disk.

Hugging Face loaders and tokenizers read local directories only, so remote artifacts / LMs are copied to a
temporary local directory first (``local_copy``) and local save directories are uploaded file by file
(``upload_dir``). File-by-file copies keep the layout predictable across fsspec backends.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import fsspec


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """True for URIs with a non-local protocol (``s3://``, ``memory://``...)."""
    text = str(uri)
    return "://" in text and not text.startswith("file://")


def _strip_file(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def exists(uri: str) -> bool:
    fs, path = fsspec.core.url_to_fs(str(uri))
    return bool(fs.exists(path))


@contextlib.contextmanager
def local_copy(uri: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a local directory holding the files under ``uri`` (the path itself when already local)."""
    text = str(uri)
    if not is_remote(text):
        yield Path(_strip_file(text))
        return
    fs, root = fsspec.core.url_to_fs(text)
    files = fs.find(root)
    if not files:
        raise FileNotFoundError(f"nothing found at {text}")
    tmp = Path(tempfile.mkdtemp(prefix="clipcap-"))
    try:
        for f in files:
            rel = posixpath.relpath(f, root)
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f, str(dest))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def upload_dir(local_dir: str | os.PathLike[str], uri: str) -> None:
    """Copy every file under ``local_dir`` to ``uri`` (created if missing), keeping relative paths."""
    fs, root = fsspec.core.url_to_fs(str(uri))
    fs.makedirs(root, exist_ok=True)
    base = Path(local_dir)
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        rel = path.relative_to(base).as_posix()
        dest = posixpath.join(root, rel)
        parent = posixpath.dirname(dest)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        fs.put_file(str(path), dest)
