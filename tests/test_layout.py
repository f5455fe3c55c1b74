"""The package layout (ARCHITECTURE.md "Packages"): one package per stage over ``pipelines.io``."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ROOT / "pipelines"
STAGES = ("io", "download", "embed", "train", "clip", "caption", "demo", "evaluate", "report", "commands")


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_package_exists(stage):
    assert (PIPELINES / stage / "__init__.py").is_file()
