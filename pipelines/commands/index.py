"""``clipcap index``: a nearest-neighbour index (faiss) over an embedding table (``pipelines.index``).

    clipcap index --input s3://b/clipcap/embeddings/cc3m/ViT-B-32-openai --output s3://b/clipcap/index/cc3m
    clipcap index --input data/text-embeddings/corpus/tiny --column text_embedding --output data/index/corpus

Exact search below ``--exact-below`` vectors, IVF above it (``--kind`` overrides: flat, ivf, hnsw); cosine
similarity (the table's vectors are normalised in the index). Query it with ``clipcap search``.
"""

from __future__ import annotations

import argparse
import json

from pipelines.commands import common, flags, options

JOB_LOG = True  # Ray's output to a log file unless -v (pipelines.console)
HELP = "build a nearest-neighbour index (faiss) over an embedding table"
CONFIG = "pipelines.index:IndexConfig"  # its fields are the flags (pipelines.commands.flags)


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_config_arguments(p, "IndexConfig", example="kind=hnsw")
    flags.add(p, CONFIG)
    common.add_ray_address(p)


def run(args: argparse.Namespace) -> int:
    from pipelines.index import build_index

    cfg = options.from_args(args, CONFIG)
    common.init_ray(args.ray_address)
    print(json.dumps(build_index(cfg), indent=2))
    return 0
