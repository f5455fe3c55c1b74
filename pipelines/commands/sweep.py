"""``clipcap sweep``: Ray Tune over prefix lengths x mapping types; prints and saves held-out BLEU-4 / CIDEr.

    clipcap sweep --tables s3://b/embeddings/coco/ViT-B-32-openai --output s3://b/sweeps \
        --prefix-lengths 1 10 20 --mappings mlp transformer --epochs 5
    clipcap sweep --config sweep.yaml --set presets.mlp=clipcap-mlp --set presets.transformer=clipcap-transformer

The table lands in ``<output>/<name>/results.{csv,json,md}``.
"""

from __future__ import annotations

import argparse
from typing import Any

from pipelines.commands import options
from pipelines.commands.train import FIELDS as TRAIN_FIELDS
from pipelines.commands.train import init_ray

_FIELDS: dict[str, tuple[str, str]] = {
    **{k: v for k, v in TRAIN_FIELDS.items() if v[0] == "train"},
    "tables": ("", "tables"), "output": ("", "output"), "name": ("", "name"),
    "prefix_lengths": ("", "prefix_lengths"), "mappings": ("", "mappings"),
    "heldout_fraction": ("", "heldout_fraction"), "eval_max_samples": ("", "eval_max_samples"),
    "max_train_rows": ("", "max_train_rows"), "trial_cpus": ("", "trial_cpus"), "trial_gpus": ("", "trial_gpus"),
    "max_concurrent": ("", "max_concurrent"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_config_arguments(p, "SweepConfig", "train.lr=1e-4, presets.mlp=clipcap-mlp")
    p.add_argument("--tables", nargs="+", help="embedding table folders or files")
    p.add_argument("--output", help="where results and Tune state go (<output>/<name>/)")
    p.add_argument("--name", help='sweep name (results under <output>/<name>/)')
    p.add_argument("--prefix-lengths", nargs="+", type=int, help="default: 1 10 20")
    p.add_argument("--mappings", nargs="+", choices=["mlp", "transformer"], help="default: mlp transformer")
    p.add_argument("--epochs", type=int, help='epochs per trial')
    p.add_argument("--batch-size", type=int, help='captions per step')
    p.add_argument("--lr", type=float, help='peak learning rate (AdamW)')
    p.add_argument("--warmup-steps", type=int, help='linear warm-up steps')
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
        help='training precision (bf16 / fp16: autocast)')
    p.add_argument("--seed", type=int, help='training seed')
    p.add_argument("--max-caption-tokens", type=int,
        help='caption tokens kept per sample (incl. end-of-text)')
    p.add_argument("--heldout-fraction", type=float, help='fraction of keys held out for evaluation')
    p.add_argument("--eval-max-samples", type=int, help='held-out samples evaluated per trial at most')
    p.add_argument("--max-train-rows", type=int,
        help='training rows per trial at most (a sweep compares on a sample)')
    p.add_argument("--trial-cpus", type=float, help='CPUs per trial')
    p.add_argument("--trial-gpus", type=float, help='GPUs per trial')
    p.add_argument("--max-concurrent", type=int, help='trials running at once at most')
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or a local instance)")


def config_from_args(args: argparse.Namespace) -> Any:
    from pipelines.sweep import SweepConfig

    return options.build(SweepConfig, options.collect(args, _FIELDS))


def run(args: argparse.Namespace) -> int:
    from pipelines.sweep import format_table, run_sweep

    cfg = config_from_args(args)
    init_ray(args.ray_address)
    rows = run_sweep(cfg)
    print(format_table(rows))
    print(f"\nsaved: {cfg.output.rstrip('/')}/{cfg.name}/results.{{csv,json,md}}")
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("sweep", help="prefix-length x mapping sweep with Ray Tune (held-out BLEU-4, CIDEr)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
