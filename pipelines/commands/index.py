"""``clipcap index``: a nearest-neighbour index (faiss) over an embedding table (``pipelines.index``).

    clipcap index --input s3://b/clipcap/embeddings/cc3m/ViT-B-32-openai --output s3://b/clipcap/index/cc3m
    clipcap index --input data/text-embeddings/corpus/tiny --column text_embedding --output data/index/corpus

Exact search below ``--exact-below`` vectors, IVF above it (``--kind`` overrides: flat, ivf, hnsw); cosine
similarity (the table's vectors are normalised in the index). Query it with ``clipcap search``.
"""

from __future__ import annotations

import argparse
import json

from pipelines.commands import common, options

JOB_LOG = True  # Ray's output to a log file unless -v (pipelines.console)
HELP = "build a nearest-neighbour index (faiss) over an embedding table"
FIELDS = {name: ("", name) for name in ("input", "output", "column", "kind", "exact_below", "nlist", "train_sample",
                                        "hnsw_m", "parallel", "seed")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pipelines.index import IndexConfig

    options.add_config_arguments(p, "IndexConfig", example="kind=hnsw")
    common.add_flags(p, f"""
        --input         str     embedding table folder or file (local, s3://, ...)
        --output        str     index folder (any URI)
        --column        str     vector column: image_embedding (default) or text_embedding
        --kind          {'|'.join(options.choices(IndexConfig, 'kind'))}  default auto: exact below --exact-below vectors, IVF from it
        --exact-below   int     auto's threshold (default 100000)
        --nlist         int     IVF lists (default ~4 sqrt(N))
        --train-sample  int     IVF: vectors sampled to train the centroids (default 100000)
        --hnsw-m        int     HNSW links per node (default 32)
        --parallel      {'|'.join(options.choices(IndexConfig, 'parallel'))}  auto: Ray tasks per table file on a multi-node cluster (IVF)
        --seed          int     seed of the IVF training sample and k-means
    """)
    common.add_ray_address(p)


def run(args: argparse.Namespace) -> int:
    from pipelines.index import IndexConfig, build_index

    cfg = options.build(IndexConfig, options.collect(args, FIELDS), FIELDS)
    common.init_ray(args.ray_address)
    print(json.dumps(build_index(cfg), indent=2))
    return 0
