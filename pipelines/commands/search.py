"""``clipcap search``: query an index made by ``clipcap index`` by text, image file or key.

    clipcap search --index data/index/synthetic --text "two small red circles at the top" -k 10
    clipcap search --index s3://b/clipcap/index/cc3m --image photo.jpg --output hits.parquet
    clipcap search --index data/index/synthetic --key 000000123

Text and images are encoded by the CLIP that made the table (named in its metadata); a key queries with that
row's own vector (it comes first, at cosine 1). Prints rank, cosine, key and caption per query.
"""

from __future__ import annotations

import argparse

HELP = "query a nearest-neighbour index by text, image or key"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", help="index folder (clipcap index --output)")
    p.add_argument("--text", nargs="+", help="query texts (encoded by the table's CLIP)")
    p.add_argument("--image", nargs="+", help="query image files (local or any URI)")
    p.add_argument("--key", nargs="+", help="keys of indexed rows (their own vectors)")
    p.add_argument("--nprobe", type=int, help="IVF lists searched per query (default: the index's)")
    p.add_argument("--output", help="also write the hits as Parquet (query, rank, score, key, caption, file, row)")
    p.add_argument("-k", "--top-k", type=int, default=10, help="neighbours per query (default 10)")


def run(args: argparse.Namespace) -> int:
    from pipelines.index import Searcher, format_hits, hits_table
    from pipelines.io import storage

    if not args.index:
        raise ValueError("--index is required (a folder made by `clipcap index`)")
    given = [(name, values) for name, values in (("text", args.text), ("image", args.image), ("key", args.key))
             if values]
    if len(given) != 1:
        raise ValueError("give exactly one of --text, --image, --key")
    kind, queries = given[0]
    searcher = Searcher.open(args.index, nprobe=args.nprobe)
    search = {"text": searcher.search_text, "image": searcher.search_images, "key": searcher.search_keys}[kind]
    hits = search(queries, k=args.top_k)
    print(format_hits(queries, hits))
    if args.output:
        storage.atomic_write_table(hits_table(queries, hits), args.output)
    return 0
