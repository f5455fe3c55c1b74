"""``clipcap sweep``: Ray Tune over prefix lengths x mapping types; prints and saves held-out BLEU-4 / CIDEr.

    clipcap sweep --input s3://b/embeddings/coco/ViT-B-32-openai --output s3://b/sweeps \
        --prefix-lengths 1 10 20 --mappings mlp transformer --epochs 5
    clipcap sweep --config sweep.yaml --set presets.mlp=clipcap-mlp --set presets.transformer=clipcap-transformer

The table lands in ``<output>/<name>/results.{csv,json,md}``.
"""

from __future__ import annotations

import argparse
from typing import Any

from pipelines.commands import common, options
from pipelines.commands.train import FIELDS as TRAIN_FIELDS
from pipelines.commands.train import add_train_flags

JOB_LOG = True  # Ray's output to a log file unless -v (pipelines.console)
HELP = "prefix-length x mapping sweep with Ray Tune (held-out BLEU-4, CIDEr)"

_FIELDS: dict[str, tuple[str, str]] = {
    **{k: v for k, v in TRAIN_FIELDS.items() if v[0] == "train"},
    "input": ("", "tables"), "output": ("", "output"), "name": ("", "name"),
    "prefix_lengths": ("", "prefix_lengths"), "mappings": ("", "mappings"),
    "heldout_fraction": ("", "heldout_fraction"), "eval_max_samples": ("", "eval_max_samples"),
    "max_train_rows": ("", "max_train_rows"), "trial_cpus": ("", "trial_cpus"), "trial_gpus": ("", "trial_gpus"),
    "max_concurrent": ("", "max_concurrent"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_config_arguments(p, "SweepConfig", "train.lr=1e-4, presets.mlp=clipcap-mlp")
    common.add_flags(p, """
        --input             str+                embedding table folders or files
        --output            str                 where results and Tune state go (<output>/<name>/)
        --name              str                 sweep name (results under <output>/<name>/)
        --prefix-lengths    int+                default: 1 10 20
        --mappings          mlp|transformer+    default: mlp transformer
    """)
    common.old_spellings(p, {"--tables": "--input"})
    add_train_flags(p, epochs="epochs per trial", batch_size="captions per step", seed="training seed")
    common.add_flags(p, """
        --heldout-fraction  float   fraction of keys held out for evaluation
        --eval-max-samples  int     held-out samples evaluated per trial at most
        --max-train-rows    int     training rows per trial at most (a sweep compares on a sample)
        --trial-cpus        float   CPUs per trial
        --trial-gpus        float   GPUs per trial
        --max-concurrent    int     trials running at once at most
    """)
    common.add_ray_address(p)


def config_from_args(args: argparse.Namespace) -> Any:
    from pipelines.train.sweep import SweepConfig

    return options.build(SweepConfig, options.collect(args, _FIELDS), _FIELDS)


def run(args: argparse.Namespace) -> int:
    from pipelines.train.sweep import format_table, run_sweep

    cfg = config_from_args(args)
    common.init_ray(args.ray_address)
    rows = run_sweep(cfg)
    print(format_table(rows))
    print(f"\nsaved: {cfg.output.rstrip('/')}/{cfg.name}/results.{{csv,json,md}}")
    return 0
