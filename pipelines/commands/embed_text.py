"""``clipcap embed-text``: a caption corpus -> CLIP text-embedding tables (``pipelines.embed_text``).

    clipcap embed-text --input s3://bucket/corpus/captions.txt --output-root s3://bucket/clipcap --dataset corpus \
        --model ViT-B-32 --pretrained openai --num-actors 2 --gpus-per-actor 1
    clipcap embed-text --input data/raw/synthetic --output-root data --dataset synthetic    # img2dataset shards
    clipcap embed-text --input captions.csv --caption-col text --key-col id ...            # csv/tsv/jsonl/parquet

Output: ``<output-root>/text-embeddings/<dataset>/<clip-tag>/part-<id>.parquet`` (key, caption, text_embedding)
+ ``_errors/``; a rerun skips finished parts. Train a text-only (DeCap) captioner on it with
``clipcap train --decoder decap --tables <that folder>``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pipelines.commands import options
from pipelines.commands.embed import FIELDS as _EMBED_FIELDS
from pipelines.commands.embed import add_options

_FIELDS = {**{k: v for k, v in _EMBED_FIELDS.items() if k not in ("text_embeddings", "decode_cpus",
                                                                   "decode_memory_mb")},
           **{k: ("", k) for k in ("input", "output_root", "dataset", "input_format", "caption_col", "key_col",
                                   "part_size", "max_caption_chars")}}


def config_from_args(args: argparse.Namespace) -> Any:
    from pipelines.embed_text import EmbedTextConfig

    return options.build(EmbedTextConfig, options.collect(args, _FIELDS))


def run(args: argparse.Namespace) -> int:
    from pipelines.embed_text import run_embed_text

    result = run_embed_text(config_from_args(args), ray_address=args.ray_address)
    print(result.describe())
    print(json.dumps(result.to_dict(), indent=2))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_config_arguments(p, "EmbedTextConfig", "resources.batch_size=256")
    p.add_argument("--input", help="caption file (txt: one per line; csv/tsv/jsonl/parquet), a folder of them, "
                   "or an img2dataset output folder")
    p.add_argument("--output-root", help="storage root; tables go to <root>/text-embeddings/<dataset>/<clip-tag>/")
    p.add_argument("--dataset", help="dataset name in the output path")
    p.add_argument("--input-format", choices=["auto", "text", "csv", "tsv", "jsonl", "parquet", "img2dataset"],
                   help="input kind (auto: by extension; img2dataset: webdataset shards with their captions)")
    p.add_argument("--caption-col", help="caption column of csv/tsv/jsonl/parquet input (default: caption)")
    p.add_argument("--key-col", help="key column (default: <file stem>-<row>)")
    p.add_argument("--part-size", type=int, help="captions per output part (default 10000)")
    p.add_argument("--max-caption-chars", type=int, help="longer captions are error rows (default 2000)")
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS, a running local head, "
                   "else a new local instance)")
    add_options(p)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("embed-text", help="embed a caption corpus with the CLIP text tower into Parquet",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
