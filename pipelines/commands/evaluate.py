"""``clipcap evaluate``: COCO metrics, CLIPScore and RefCLIPScore of captions (``pipelines.evaluate``).

    clipcap evaluate --predictions s3://b/captions/run1 --references captions_val2014.json --output ./eval/run1
    clipcap evaluate --predictions results.json --references refs.parquet --images ./val2014 \\
                     --model s3://b/models/m1 --output ./eval/m1      # + CLIPScore with m1's CLIP

Predictions: our caption table (folder or file), a COCO results JSON, or a Parquet/JSONL/CSV table.
References: a COCO captions annotation JSON, {id: [captions]} JSON, or a Parquet/JSONL/CSV table (id, caption).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

_FIELDS = ("predictions", "references", "output", "images", "model", "clip_model", "clip_pretrained",
           "id_match", "prediction_id_column", "reference_id_column", "caption_column", "tokenize", "spice",
           "device")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--predictions", required=True, help="caption table, COCO results JSON or table URI")
    p.add_argument("--references", required=True, help="COCO annotations JSON or reference table URI")
    p.add_argument("--output", required=True, help="folder for per_image.parquet, summary.json, results.json")
    p.add_argument("--images", help="images (folder / archives / Parquet) or an embedding table: adds CLIPScore")
    p.add_argument("--model", help="model artifact whose CLIP scores (default: the caption table's model)")
    p.add_argument("--clip-model", help="open_clip model name (instead of --model)")
    p.add_argument("--clip-pretrained", help="open_clip tag, local file or URI of the CLIP weights")
    p.add_argument("--id-match", choices=["auto", "key", "stem", "number"],
                   help="how ids pair up: exact key, file stem, or trailing number (COCO file names)")
    p.add_argument("--prediction-id-column", help="default: key, then image_id")
    p.add_argument("--reference-id-column", help="default: key, then image_id")
    p.add_argument("--caption-column", help="predictions table: the caption column (default: caption)")
    p.add_argument("--metrics", help="comma list of bleu,meteor,rouge,cider,spice (default: all but spice)")
    p.add_argument("--tokenize", choices=["ptb", "simple"], help="ptb (COCO's, Java; default) or simple")
    p.add_argument("--spice", choices=["auto", "on", "off"],
                   help="auto: when Stanford CoreNLP is present; on: try (downloads it when online)")
    p.add_argument("--device", help="for the CLIP forward passes (cpu, cuda)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")


def config_from_args(args: argparse.Namespace) -> Any:
    from clipcap_core.configs import from_dict
    from pipelines.evaluate import EvaluateConfig

    data: dict[str, Any] = {k: getattr(args, k) for k in _FIELDS if getattr(args, k, None) is not None}
    if args.metrics:
        data["metrics"] = [m.strip() for m in args.metrics.split(",") if m.strip()]
    return from_dict(EvaluateConfig, data)


def run(args: argparse.Namespace) -> int:
    from pipelines.evaluate import format_table, run_evaluate

    summary = run_evaluate(config_from_args(args))
    print(json.dumps(summary, indent=2) if args.json else format_table(summary))
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("evaluate", help="COCO metrics + CLIPScore of captions against references",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
