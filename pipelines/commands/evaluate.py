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

from pipelines.commands import common

HELP = "COCO metrics + CLIPScore of captions against references"

_FIELDS = ("predictions", "references", "output", "images", "model", "clip", "clip_pretrained",
           "id_match", "prediction_id_column", "reference_id_column", "caption_column", "tokenize", "spice",
           "device")


def add_arguments(p: argparse.ArgumentParser) -> None:
    for flag, help_text in (("--predictions", "caption table, COCO results JSON or table URI"),
                            ("--references", "COCO annotations JSON or reference table URI"),
                            ("--output", "folder for per_image.parquet, summary.json, results.json")):
        p.add_argument(flag, required=True, help=help_text)
    common.add_flags(p, """
        --images            str     images (folder / archives / Parquet) or an embedding table: adds CLIPScore
        --model             str     model artifact whose CLIP scores (default: the caption table's model)
        --clip              str     open_clip model name (instead of --model)
        --clip-pretrained   str     open_clip tag, local file or URI of the CLIP weights
        --id-match          auto|key|stem|number
                                    how ids pair up: exact key, file stem, or trailing number (COCO file names)
        --prediction-id-column  str  default: key, then image_id
        --reference-id-column   str  default: key, then image_id
        --caption-column    str     predictions table: the caption column (default: caption)
        --metrics           str     comma list of bleu,meteor,rouge,cider,spice (default: all but spice)
        --tokenize          ptb|simple  ptb (COCO's, Java; default) or simple
        --spice             auto|on|off  auto: when Stanford CoreNLP is present; on: try (downloads it when online)
        --device            str     for the CLIP forward passes (cpu, cuda)
    """)
    common.old_spellings(p, {"--clip-model": "--clip"})
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")


def config_from_args(args: argparse.Namespace) -> Any:
    from clipcap_core.configs import from_dict
    from pipelines.evaluate.run import EvaluateConfig

    data: dict[str, Any] = {k: getattr(args, k) for k in _FIELDS if getattr(args, k, None) is not None}
    if "clip" in data:
        data["clip_model"] = data.pop("clip")
    if args.metrics:
        data["metrics"] = [m.strip() for m in args.metrics.split(",") if m.strip()]
    return from_dict(EvaluateConfig, data)


def run(args: argparse.Namespace) -> int:
    from pipelines.evaluate.run import format_table, run_evaluate

    summary = run_evaluate(config_from_args(args))
    common.print_result(None, summary if args.json else format_table(summary))
    return 0
