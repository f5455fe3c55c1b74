"""``clipcap report``: one self-contained HTML report of a captioning run (``pipelines.report``).

    clipcap report --input s3://b/captions/run1 --evaluation ./eval/run1 --run s3://b/runs/cc3m-mlp \\
                   --output report.html

The page opens with what went wrong (captions matching no reference, empty or looping captions, the lowest
CLIPScores). The gallery samples a few parts of the caption table (never the whole table); images come from the input
recorded in the table's ``_run.json`` (or ``--images``); the model card and prefix interpretation from the
model recorded in the table (or ``--model``).
"""

from __future__ import annotations

import argparse

from pipelines.commands import common, flags, options

HELP = "write a self-contained HTML report of a captioning run"

CONFIG = "pipelines.report.build:ReportConfig"  # its fields are the flags (pipelines.commands.flags)


def add_arguments(p: argparse.ArgumentParser) -> None:
    flags.add(p, CONFIG)


def run(args: argparse.Namespace) -> int:
    from pipelines.report.build import build_report

    common.require(args, "input", "output")
    print(build_report(options.from_args(args, CONFIG)))
    return 0
