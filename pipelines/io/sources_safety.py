"""Safety checks on what an input holds: archive members and loose files, before any byte is used."""

from __future__ import annotations

import os
import re
import stat
import tarfile
from typing import Any

from clipcap_core import uris
from pipelines.io import storage
from pipelines.io.sources_base import InputFile, SourceConfig


def unsafe_member(name: str) -> str | None:
    """Why an archive member name must not be used (absolute, drive letter, ``..``), or None."""
    if "\x00" in name:
        return "member name contains NUL"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "unsafe member path (absolute)"
    if ".." in re.split(r"[\\/]+", name):
        return "unsafe member path ('..')"
    return None


def member_problem(raw_name: str, name: str, size: int, seen: set[str], cfg: SourceConfig,
                    *kind_checks: tuple[bool, str]) -> str | None:
    """Why an archive member must not be read (None if it may): unsafe path, then the format's own checks
    (links, encryption), then duplicates and size. Records ``name`` in ``seen`` either way."""
    why = unsafe_member(raw_name)
    for bad, reason in kind_checks:
        if why is None and bad:
            why = reason
    if why is None and name in seen:
        why = "duplicate member name"
    if why is None and size > cfg.max_member_bytes:
        why = f"member too large ({size} bytes > {cfg.max_member_bytes})"
    seen.add(name)
    return why


def tar_member_problem(m: tarfile.TarInfo, seen: set[str], cfg: SourceConfig) -> str | None:
    """Why tar member ``m`` must not be read (unsafe path, link or device, duplicate, too large), or None; the
    one check for every tar reader (caption's readers, embed's and embed-text's shard reader)."""
    return member_problem(m.name, clean_name(m.name), m.size, seen, cfg,
                           (not m.isfile(), "not a regular file (link or device)"))


def clean_name(name: str) -> str:
    """``name`` without leading ``./`` (tar members are often stored so)."""
    while name.startswith("./"):
        name = name[2:]
    return name


def check_local_file(uri: str, rel: str) -> str:
    """The real path of a local loose file, refused unless it is a regular file inside the real input folder
    (a symlink to /etc/passwd or /dev/zero in a user's folder must not be read)."""
    path = uris.filesystem(uri)[1]
    root = path[: len(path) - len(rel)] if path.endswith(rel) else os.path.dirname(path)
    real, real_root = os.path.realpath(path), os.path.realpath(root or ".")
    if real != real_root and not real.startswith(real_root.rstrip("/") + "/"):
        raise PermissionError(f"symlink leads outside the input folder ({rel!r})")
    if not stat.S_ISREG(os.stat(real).st_mode):
        raise PermissionError(f"not a regular file ({rel!r})")
    return real


def read_loose_file(fs: Any, f: InputFile, limit: int) -> bytes:
    """At most ``limit`` bytes of a loose file (more is an error: listed sizes can lie, e.g. devices)."""
    if storage.protocol_prefix(fs) == "":
        with open(check_local_file(f.uri, f.rel), "rb") as fh:
            data = fh.read(limit + 1)
    else:
        # open + bounded read, not cat_file: the object may be larger than the listing said.
        with fs.open(uris.filesystem(f.uri)[1], "rb") as fh:
            data = fh.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"file larger than {limit} bytes")
    return data
