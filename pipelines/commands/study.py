"""``clipcap study prefix``: prefix length x mapping x LM (frozen / fine-tuned) x seeds, on Ray Tune, with held-out
BLEU-1..4, METEOR, ROUGE-L, CIDEr and CLIPScore as mean and spread over seeds, training time and trainable
parameters per setting (``pipelines.train.study``). ``clipcap study decoding``: one trained model's held-out rows
captioned greedily, by beam search, by sampling and by n samples + CLIP rerank: images/s and the same metrics
(``pipelines.evaluate.decoding_study``).

    clipcap study prefix --input data/embeddings/scenes/tiny-scenes --output studies \\
        --set model_overrides.tokenizer=word-scenes
    clipcap study prefix --input s3://b/embeddings/coco/ViT-B-32-openai --output s3://b/studies \\
        --set presets.mlp=clipcap-mlp --set presets.transformer=clipcap-transformer --trial-gpus 1
    clipcap study decoding --input data/embeddings/scenes/tiny-scenes --model runs/scenes/model --output studies

Output in ``<output>/<name>/``: ``table.md``, ``table.parquet`` and ``prefix.png`` + ``trials.parquet`` (prefix) or
``decoding.png`` (decoding).
"""

from __future__ import annotations

import argparse
from typing import Any

from pipelines.commands import common, flags, options

JOB_LOG = True  # Ray's output to a log file unless -v (pipelines.console)
HELP = "studies: prefix length x mapping x frozen / tuned LM x seeds (Ray Tune); decoding strategies' cost and gain"

PREFIX = "pipelines.train.study:StudyConfig"  # their fields are the flags (pipelines.commands.flags)
DECODING = "pipelines.evaluate.decoding_study:DecodingStudyConfig"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", choices=["prefix", "decoding"],
                   help="prefix: prefix length x mapping x LM x seeds; decoding: strategies of one model")
    options.add_config_arguments(p, "StudyConfig", "model_overrides.tokenizer=word-scenes")
    flags.add(p, PREFIX, title="study")
    flags.add(p, DECODING, skip=tuple(flags.fields(PREFIX)), title="study decoding")
    common.add_ray_address(p)


def config_from_args(args: argparse.Namespace) -> Any:
    return options.from_args(args, DECODING if args.study == "decoding" else PREFIX)


def run(args: argparse.Namespace) -> int:
    from pipelines.train.study import format_table, run_prefix_study

    cfg = config_from_args(args)
    if args.study == "decoding":
        from pipelines.evaluate import decoding_study

        print(decoding_study.format_table(decoding_study.run_decoding_study(cfg)))
        print(f"\nsaved: {cfg.output.rstrip('/')}/{cfg.name}/{{table.md,table.parquet,decoding.png}}")
        return 0
    common.init_ray(args.ray_address)
    _, table = run_prefix_study(cfg)
    print(format_table(table))
    print(f"\nsaved: {cfg.output.rstrip('/')}/{cfg.name}/{{table.md,table.parquet,trials.parquet,prefix.png}}")
    return 0
