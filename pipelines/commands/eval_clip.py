"""``clipcap eval-clip``: retrieval R@1/5/10 (image->text, text->image) and zero-shot classification of a CLIP.

    clipcap eval-clip --clip tiny --shards data/raw/synthetic --part heldout
    clipcap eval-clip --clip ViT-B-32 --clip-pretrained s3://b/clip-runs/x/model/x.safetensors \
        --shards s3://b/raw/val --classes classes.txt --templates templates.txt --output eval.json

Prints a table and writes the JSON report to ``--output`` when given (``pipelines.clip.evaluate``).
"""

from __future__ import annotations

import argparse

from pipelines.commands import flags, options

HELP = "retrieval and zero-shot evaluation of a CLIP model"
CONFIG = "pipelines.clip.evaluate:EvalClipConfig"  # its fields are the flags (pipelines.commands.flags)


def run(args: argparse.Namespace) -> int:
    from pipelines.clip.evaluate import evaluate_clip, format_report
    from pipelines.io import storage

    report = evaluate_clip(options.from_args(args, CONFIG))
    print(format_report(report))
    if args.output:
        storage.write_json(report, args.output)
        print(f"report: {args.output}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    flags.add(p, CONFIG)
    p.add_argument("--output", help="write the JSON report here (any URI)")
