"""``clipcap evaluate``: COCO metrics, CLIPScore and RefCLIPScore of captions (``pipelines.evaluate``).

    clipcap evaluate --predictions s3://b/captions/run1 --references captions_val2014.json --output ./eval/run1
    clipcap evaluate --predictions results.json --references refs.parquet --images ./val2014 \\
                     --model s3://b/models/m1 --output ./eval/m1      # + CLIPScore with m1's CLIP

Predictions: our caption table (folder or file), a COCO results JSON, or a Parquet/JSONL/CSV table.
References: a COCO captions annotation JSON, {id: [captions]} JSON, or a Parquet/JSONL/CSV table (id, caption).
"""

from __future__ import annotations

import argparse
from typing import Any

from pipelines.commands import common, flags, options

HELP = "COCO metrics + CLIPScore of captions against references"

CONFIG = "pipelines.evaluate.run:EvaluateConfig"  # its fields are the flags (pipelines.commands.flags)


def add_arguments(p: argparse.ArgumentParser) -> None:
    flags.add(p, CONFIG, required=True)
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")


def config_from_args(args: argparse.Namespace) -> Any:
    return options.from_args(args, CONFIG)


def run(args: argparse.Namespace) -> int:
    from pipelines.evaluate.run import format_table, run_evaluate

    summary = run_evaluate(config_from_args(args))
    common.print_result(None, summary if args.json else format_table(summary))
    return 0
