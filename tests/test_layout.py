"""The package layout (ARCHITECTURE.md "Packages"): one package per stage over ``pipelines.io``,
and stage packages whose re-exports are lazy."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ROOT / "pipelines"
STAGES = ("io", "download", "embed", "train", "clip", "caption", "demo", "evaluate", "report", "commands")
LAZY = ("download", "embed", "train", "clip", "caption", "demo")


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_package_exists(stage):
    assert (PIPELINES / stage / "__init__.py").is_file()


def test_no_code_imports_io_modules_through_the_old_top_level_names():
    """``from pipelines import storage`` works (a lazy alias); our own code names ``pipelines.io``."""
    io_names = {p.stem for p in (PIPELINES / "io").glob("*.py")} - {"__init__"}
    pattern = re.compile(r"^\s*from pipelines import (.+)$", re.M)
    found = []
    for path in [*ROOT.glob("pipelines/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("benchmarks/*.py"),
                 *ROOT.glob("jobs/*.py")]:
        if path == Path(__file__).resolve():
            continue  # the test below uses the aliases on purpose
        for match in pattern.finditer(path.read_text()):
            names = {n.strip().split(" as ")[0] for n in match[1].split(",")}
            found += [f"{path.relative_to(ROOT)}: {n}" for n in sorted(names & io_names)]
    assert found == []


def test_stage_packages_import_no_submodule_until_a_name_is_used():
    """Ray decode tasks import ``pipelines.embed.stages`` / ``pipelines.caption.stages``; their packages must
    not pull in the jobs (and torch) with them."""
    code = ("import json, sys\n"
            f"import {', '.join('pipelines.' + s for s in LAZY)}\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('pipelines.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == ["pipelines._lazy", *sorted(f"pipelines.{s}" for s in LAZY)]


@pytest.mark.parametrize("stage", LAZY)
def test_every_re_exported_name_resolves_to_its_submodule(stage):
    package = importlib.import_module(f"pipelines.{stage}")
    for module, names in package._EXPORTS.items():
        real = importlib.import_module(f"pipelines.{stage}.{module}")
        for name in names:
            assert getattr(package, name) is getattr(real, name), (stage, name)
    with pytest.raises(AttributeError):
        package.no_such_name  # noqa: B018


def test_old_public_imports_keep_working():
    from pipelines import schemas, storage
    from pipelines.caption import CaptionConfig, ResourceOptions, caption_archive
    from pipelines.embed import EmbedConfig, EmbedResources, run_embed
    from pipelines.train import FaultConfig, RunOptions, ScaleConfig, TrainJobConfig, run_training

    assert storage.__name__ == "pipelines.io.storage" and schemas.__name__ == "pipelines.io.schemas"
    assert run_embed.__module__ == "pipelines.embed.job" and EmbedConfig and EmbedResources
    assert run_training.__module__ == "pipelines.train.job" and TrainJobConfig
    assert {c.__module__ for c in (RunOptions, ScaleConfig, FaultConfig)} == {"pipelines.train.state"}
    assert caption_archive.__module__ == "pipelines.caption.job" and CaptionConfig and ResourceOptions
