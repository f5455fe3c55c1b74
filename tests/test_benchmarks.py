"""``benchmarks/gpu_check.sh`` runs once, on a borrowed GPU machine with minutes of budget: a flag it passes that a
benchmark (or ``clipcap``) does not take would waste the run. Each benchmark line must parse with that
benchmark's own flags, and what it hands ``clipcap`` through ``--extra-flags`` with the command's."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def gpu_check_commands() -> dict[str, list[str]]:
    """benchmark name -> its argv, from each ``"$PY" benchmarks/<name>.py ...`` line of gpu_check.sh."""
    text = (ROOT / "benchmarks/gpu_check.sh").read_text().replace("\\\n", " ")
    commands = {}
    for line in text.splitlines():
        m = re.search(r'"\$PY" benchmarks/(\w+)\.py(.*?)(;;|$)', line)
        if m and not line.lstrip().startswith("#"):
            commands[m.group(1)] = shlex.split(m.group(2).replace("$RESULTS", "/tmp/results"))
    return commands


def test_gpu_check_runs_the_speed_benchmarks_the_issue_names():
    assert set(gpu_check_commands()) == {"decode", "embed", "caption", "train"}


@pytest.mark.parametrize("name", ["decode", "embed", "caption", "train"])
def test_every_gpu_check_line_parses_with_its_benchmarks_flags(name):
    from pipelines.cli import command_parser

    argv = gpu_check_commands()[name]
    args = importlib.import_module(f"benchmarks.{name}").parser().parse_args(argv)  # SystemExit on a bad flag
    extra = getattr(args, "extra_flags", "")
    if extra:  # what the benchmark adds to `clipcap <command> <its own required flags>`
        required = {"embed": ["--input", "x", "--output", "y", "--dataset", "d"],
                    "caption": ["--input", "x", "--output", "y", "--model", "m"]}[name]
        parsed = command_parser(name).parse_args(required + extra.split())
        assert all(getattr(parsed, flag.lstrip("-").replace("-", "_")) is not None
                   for flag in extra.split() if flag.startswith("--"))
    if name in ("decode", "embed"):  # the GPU figures must be taken on the GPU
        assert args.device == "cuda"
