"""The fsspec helpers below every other (``pipelines.io.storage`` builds on them): a URI -> (filesystem,
path), existence, remote-or-local, and moving model files between any fsspec URI and local disk.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec


def is_remote(uri: str | os.PathLike[str]) -> bool:
    """True for URIs with a non-local protocol (``s3://``, ``memory://``...)."""
    text = str(uri)
    return "://" in text and not text.startswith("file://")


def filesystem(uri: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
               ) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(str(uri), **(storage_options or {}))


def exists(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    return bool(fs.exists(path))


def download_file(uri: str, dest: Path) -> None:
    """Copy the file at ``uri`` to ``dest`` by a temporary name + rename (concurrent copies: same bytes)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{uuid.uuid4().hex}.part")
    with fsspec.open(uri, "rb") as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 24):
            dst.write(chunk)
    os.replace(tmp, dest)


@contextlib.contextmanager
def local_copy(uri: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a local directory holding the files under ``uri`` (the path itself when already local)."""
    text = str(uri)
    if not is_remote(text):
        yield Path(text.removeprefix("file://"))
        return
    fs, root = filesystem(text)
    files = fs.find(root)
    if not files:
        raise FileNotFoundError(f"nothing found at {text}")
    # Every destination is checked before the first byte is written: a tampered listing copies nothing.
    plan = [(f, check_relative(_relative_key(f, root), what=text)) for f in files]
    tmp = Path(tempfile.mkdtemp(prefix="clipcap-"))
    try:
        for f, rel in plan:
            dest = safe_join(tmp, rel, what=text)
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f, str(dest))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_DRIVE = re.compile(r"^[A-Za-z]:")


def _relative_key(key: str, root: str) -> str:
    """``key`` relative to ``root`` by prefix only (no normalisation, which would resolve ``..``)."""
    prefix = root.rstrip("/") + "/"
    if not key.startswith(prefix):
        raise ValueError(f"object {key!r} listed under {root!r} is not inside it")
    return key[len(prefix):]


def check_relative(rel: str, what: str = "path") -> str:
    """``rel`` when it is a plain relative POSIX path (no absolute / drive / ``..`` / ``.`` / empty parts)."""
    if (not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or "\0" in rel
            or _DRIVE.match(rel) or any(p in ("", ".", "..") for p in rel.split("/"))):
        raise ValueError(f"{what}: refusing unsafe file name {rel!r} (absolute, drive, '..' or empty parts)")
    return rel


def safe_join(base: Path, rel: str, what: str = "path") -> Path:
    """``base / rel`` when ``rel`` is a plain relative path that stays inside ``base`` (symlinks resolved)."""
    dest = Path(base) / check_relative(rel, what)
    real_base = Path(base).resolve()
    if not dest.resolve().is_relative_to(real_base):
        raise ValueError(f"{what}: file name {rel!r} resolves outside {base}")
    return dest


def upload_dir(local_dir: str | os.PathLike[str], uri: str) -> None:
    """Copy every file under ``local_dir`` to ``uri`` (created if missing), keeping relative paths."""
    fs, root = filesystem(uri)
    fs.makedirs(root, exist_ok=True)
    base = Path(local_dir)
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        dest = posixpath.join(root, path.relative_to(base).as_posix())
        fs.makedirs(posixpath.dirname(dest), exist_ok=True)
        fs.put_file(str(path), dest)
