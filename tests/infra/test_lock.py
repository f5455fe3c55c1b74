"""Supply chain: the lock pins every package with hashes, covers every dependency the
project declares, and is what setup / images install."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[2]


def _lock() -> dict[str, tuple[str, list[str]]]:
    text = (ROOT / "requirements.lock").read_text().replace("\\\n", " ")
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-\[\],]+)==(\S+)(.*)$", line.strip())
        if m:
            name = re.sub(r"\[.*\]", "", m.group(1)).lower().replace("_", "-")
            out[name] = (m.group(2), re.findall(r"--hash=sha256:([0-9a-f]{64})", m.group(3)))
    return out


def _declared() -> list[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = meta["dependencies"] + meta["optional-dependencies"]["dev"]
    return [re.split(r"[<>=\[;! ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs]


def test_every_locked_package_is_pinned_with_a_hash():
    lock = _lock()
    assert len(lock) > 100
    assert [n for n, (_, hashes) in lock.items() if not hashes] == []
    assert lock["torch"][0] == "2.14.1" and lock["torchvision"][0] == "0.29.1"  # requirements.txt's pins


def test_every_declared_dependency_is_locked_and_nothing_unused_is_declared():
    lock = _lock()
    assert [d for d in _declared() if d not in lock] == []
    assert "wandb" not in _declared()  # only img2dataset needs it (imported at its load), so it brings it


def test_setup_and_images_install_from_the_lock_with_hash_checking():
    assert "--require-hashes -r requirements.lock" in (ROOT / "Makefile").read_text()
    assert "--require-hashes -r requirements.lock" in (ROOT / "infra/kuberay/Dockerfile").read_text()
    assert "--require-hashes -r /home/ubuntu/clipcap/requirements.lock" in (
        ROOT / "infra/cluster/clipcap-aws.yaml").read_text()
