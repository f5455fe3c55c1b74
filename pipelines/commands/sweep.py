"""``clipcap sweep``: Ray Tune over prefix lengths x mapping types; prints and saves held-out BLEU-4 / CIDEr.

    clipcap sweep --input s3://b/embeddings/coco/ViT-B-32-openai --output s3://b/sweeps \
        --prefix-lengths 1 10 20 --mappings mlp transformer --epochs 5
    clipcap sweep --config sweep.yaml --set presets.mlp=clipcap-mlp --set presets.transformer=clipcap-transformer

The table lands in ``<output>/<name>/results.{csv,json,md}``.
"""

from __future__ import annotations

import argparse
from typing import Any

from pipelines.commands import common, flags, options

JOB_LOG = True  # Ray's output to a log file unless -v (pipelines.console)
HELP = "prefix-length x mapping sweep with Ray Tune (held-out BLEU-4, CIDEr)"

CONFIG = "pipelines.train.sweep:SweepConfig"  # its fields are the flags (pipelines.commands.flags)


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_config_arguments(p, "SweepConfig", "train.lr=1e-4, presets.mlp=clipcap-mlp")
    flags.add(p, CONFIG)
    common.add_ray_address(p)


def config_from_args(args: argparse.Namespace) -> Any:
    return options.from_args(args, CONFIG)


def run(args: argparse.Namespace) -> int:
    from pipelines.train.sweep import format_table, run_sweep

    cfg = config_from_args(args)
    common.init_ray(args.ray_address)
    rows = run_sweep(cfg)
    print(format_table(rows))
    print(f"\nsaved: {cfg.output.rstrip('/')}/{cfg.name}/results.{{csv,json,md}}")
    return 0
