"""``clipcap embed-text``: a caption corpus -> CLIP text-embedding tables (``pipelines.embed.text``).

    clipcap embed-text --input s3://bucket/corpus/captions.txt --output s3://bucket/clipcap --dataset corpus \
        --clip ViT-B-32 --clip-pretrained openai --num-actors 2 --gpus-per-actor 1
    clipcap embed-text --input data/raw/synthetic --output data --dataset synthetic    # img2dataset shards
    clipcap embed-text --input captions.csv --caption-col text --key-col id ...            # csv/tsv/jsonl/parquet

Output: ``<output>/text-embeddings/<dataset>/<clip-tag>/part-<id>.parquet`` (key, caption, text_embedding)
+ ``_errors/``; a rerun skips finished parts. Train a text-only (DeCap) captioner on it with
``clipcap train --decoder decap --input <that folder>``.
"""

from __future__ import annotations

import argparse
from typing import Any

from pipelines.commands import common, options
from pipelines.commands.embed import FIELDS as _EMBED_FIELDS
from pipelines.commands.embed import add_options

# SIGTERM / Ctrl-C: stop committing, say how many parts are committed, exit 143 / 130 (pipelines.stopping)
STOP_ON_SIGNALS = True
JOB_LOG = True  # Ray's output to a log file unless -v (pipelines.console)
HELP = "embed a caption corpus with the CLIP text tower into Parquet"

_FIELDS = {**{k: v for k, v in _EMBED_FIELDS.items() if k not in ("text_embeddings", "decode_cpus",
                                                                   "decode_memory_mb")},
           **{k: ("", k) for k in ("input", "dataset", "input_format", "caption_col", "key_col", "part_size",
                                   "max_caption_chars")}, "output": ("", "output_root")}


def config_from_args(args: argparse.Namespace) -> Any:
    from pipelines.embed.text import EmbedTextConfig

    return options.build(EmbedTextConfig, options.collect(args, _FIELDS), _FIELDS)


def run(args: argparse.Namespace) -> int:
    from pipelines.embed.text import run_embed_text

    result = run_embed_text(config_from_args(args), ray_address=args.ray_address)
    common.print_result(result.describe(), result.to_dict())
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_config_arguments(p, "EmbedTextConfig", "resources.batch_size=256")
    common.add_flags(p, """
        --input             str     caption file (txt: one per line; csv/tsv/jsonl/parquet), a folder of them,
                                    or an img2dataset output folder
        --output            str     storage root; tables go to <output>/text-embeddings/<dataset>/<clip-tag>/
        --dataset           str     dataset name in the output path
        --input-format      auto|text|csv|tsv|jsonl|parquet|img2dataset
                                    input kind (auto: by extension; img2dataset: webdataset shards with their captions)
        --caption-col       str     caption column of csv/tsv/jsonl/parquet input (default: caption)
        --key-col           str     key column (default: <file stem>-<row>)
        --part-size         int     captions per output part (default 10000)
        --max-caption-chars int     longer captions are error rows (default 2000)
        --force-unlock      switch  take the table's lease (_meta/.../lease.json) even from a run that looks alive
    """)
    common.old_spellings(p, {"--output-root": "--output"})
    common.add_ray_address(p, common.RAY_ADDRESS_HEAD_HELP)
    add_options(p)
