"""``clipcap_core`` is pure PyTorch + tokenizers (ARCHITECTURE.md): importing any of its modules must not import
Ray or ``pipelines``. Checked in a fresh interpreter, where nothing else has imported them yet."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import clipcap_core

_PROBE = """
import importlib, json, pkgutil, sys
import clipcap_core
names = sorted(m.name for m in pkgutil.iter_modules(clipcap_core.__path__, "clipcap_core."))
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "loaded": sorted(m for m in sys.modules
                                                       if m.split(".")[0] in ("ray", "pipelines"))}))
"""


def test_no_clipcap_core_module_imports_ray_or_pipelines():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=600)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    expected = {m.name for m in pkgutil.iter_modules(clipcap_core.__path__, "clipcap_core.")}
    assert set(report["modules"]) == expected and len(expected) > 15
    assert report["loaded"] == []
