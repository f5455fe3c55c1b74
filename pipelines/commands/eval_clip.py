"""``clipcap eval-clip``: retrieval R@1/5/10 (image->text, text->image) and zero-shot classification of a CLIP.

    clipcap eval-clip --clip tiny --shards data/raw/synthetic --part heldout
    clipcap eval-clip --clip ViT-B-32 --clip-pretrained s3://b/clip-runs/x/model/x.safetensors \
        --shards s3://b/raw/val --classes classes.txt --templates templates.txt --output eval.json

Prints a table and writes the JSON report to ``--output`` when given (``pipelines.clip.evaluate``).
"""

from __future__ import annotations

import argparse

from pipelines.commands import common

HELP = "retrieval and zero-shot evaluation of a CLIP model"


def run(args: argparse.Namespace) -> int:
    from clipcap_core.encoders import EncoderConfig
    from pipelines.clip.evaluate import EvalClipConfig, evaluate_clip, format_report
    from pipelines.io import storage

    cfg = EvalClipConfig(encoder=EncoderConfig(model_name=args.clip, pretrained=args.clip_pretrained),
                         shards=tuple(args.shards or ()), tables=tuple(args.tables or ()), part=args.part,
                         heldout_fraction=args.heldout_fraction, split_salt=args.split_salt,
                         max_samples=args.max_samples, classes=args.classes, templates=args.templates,
                         device=args.device)
    report = evaluate_clip(cfg)
    print(format_report(report))
    if args.output:
        storage.write_json(report, args.output)
        print(f"report: {args.output}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clip", default="tiny", help="open_clip model name (default: tiny)")
    p.add_argument("--clip-pretrained", help="open_clip tag, weights file or object-store URI")
    common.old_spellings(p, {"--model": "--clip", "--pretrained": "--clip-pretrained"})
    p.add_argument("--shards", nargs="+", help="webdataset shard folders or .tar files")
    p.add_argument("--tables", nargs="+", help="embedding tables with image and text embeddings")
    p.add_argument("--part", choices=["all", "heldout", "train"], default="all", help="key-hash split to evaluate")
    p.add_argument("--heldout-fraction", type=float, default=0.05, help="the training job's held-out fraction")
    p.add_argument("--split-salt", default="clipcap-heldout", help="the training job's split salt")
    p.add_argument("--max-samples", type=int, default=5000, help="pairs evaluated (0 = all)")
    p.add_argument("--classes", help="file with one class name per line (zero-shot)")
    p.add_argument("--templates", help="file with one prompt template per line, each with {} (default: {})")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    p.add_argument("--output", help="write the JSON report here (any URI)")
