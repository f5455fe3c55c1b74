"""``clipcap index`` / ``clipcap search`` at scale: build time, peak memory against the raw vectors, query latency,
and top-10 agreement of the approximate index (default: IVF above 100k vectors) with exact search.

    python benchmarks/index.py                          # 100k and 1M 512-d vectors; ~10 min on 2 cores
    python benchmarks/index.py --sizes 100000 --kinds ivf hnsw

Vectors are CLIP-like (300 topics x 30 near-duplicate groups + noise; i.i.d. noise has no neighbours worth the
name), written as one embedding table per 250k rows. Each build runs in a fresh process with the defaults
(``build_index(IndexConfig(input, output))``), so its peak RSS less the same process's RSS before the build is
the build's own memory. Figures -> benchmarks/results/index.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    fixed = np.random.default_rng(0)
    topics = fixed.normal(size=(300, d))
    groups = topics[fixed.integers(0, 300, 9000)] + 0.5 * fixed.normal(size=(9000, d))
    rng = np.random.default_rng(seed)
    return (groups[rng.integers(0, 9000, n)] + 0.25 * rng.normal(size=(n, d))).astype(np.float32)


def write_tables(folder: Path, n: int, d: int, per_file: int = 250_000) -> None:
    import pyarrow as pa

    from pipelines.io import schemas, storage

    meta = schemas.embedding_metadata(clip_model="", clip_pretrained=None, dim=d, dtype="float32", preprocess="bench")
    schema = schemas.with_metadata(schemas.embedding_schema(d), meta)
    for i, start in enumerate(range(0, n, per_file)):
        m = min(per_file, n - start)
        v = clustered(m, d, seed=1000 + i)
        keys = [f"k{start + j}" for j in range(m)]
        table = pa.table({"key": keys, "caption": keys, "url": [None] * m,
                          "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), d)},
                         schema=schema)
        storage.atomic_write_table(table, str(folder / f"part-{i:05d}.parquet"), compression="none")


def build_child(tables: str, out: str, kind: str) -> None:
    """In a fresh process: build with the defaults (or ``kind``), print JSON with the peak RSS of the build. The
    baseline is taken after the imports and a footer read, so the difference is the build's own memory."""
    import faiss  # noqa: F401 - its libraries are part of the baseline, not of the build

    from pipelines.index import IndexConfig, build_index
    from pipelines.io import tables as tbl

    tbl.inspect_tables(tbl.list_table_files(tables))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    info = build_index(IndexConfig(input=tables, output=out, kind=kind))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "rss_before_mb": before / 1024, "rss_peak_mb": peak / 1024,
                      "kind": info["kind"], "count": info["count"], "nlist": info["nlist"], "nprobe": info["nprobe"]}))


def query_figures(out: str, exact: str | None, d: int, n_queries: int = 200) -> dict:
    from pipelines.index import Searcher

    s = Searcher.open(out)
    q = clustered(n_queries, d, seed=7)
    times = []
    for row in q:
        t0 = time.perf_counter()
        s.search_vectors(row[None], k=10)
        times.append(time.perf_counter() - t0)
    res: dict = {"query_p50_ms": 1000 * float(np.median(times)), "query_p95_ms": 1000 * float(np.percentile(times, 95))}
    if exact:
        approx = s.search_vectors(q[:100], k=10)
        truth = Searcher.open(exact).search_vectors(q[:100], k=10)
        res["top10_agreement"] = float(np.mean([len({h["key"] for h in a} & {h["key"] for h in b}) / 10
                                                for a, b in zip(approx, truth, strict=True)]))
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--kinds", nargs="+", default=["auto", "flat"], help="auto = the default kind for the size")
    p.add_argument("--root", default="/tmp/clipcap-index-bench")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        build_child(*args.child)
        return
    results = []
    for n in args.sizes:
        tables = Path(args.root, f"t{n}")
        if not tables.exists():
            write_tables(tables, n, args.dim)
        raw_mb = n * args.dim * 4 / 2**20
        outs = {}
        for kind in args.kinds:
            out = str(Path(args.root, f"ix{n}-{kind}"))
            child = subprocess.run([sys.executable, __file__, "--child", str(tables), out, kind], check=True,
                                   capture_output=True, text=True)
            build = json.loads(child.stdout.strip().splitlines()[-1])
            outs[build["kind"]] = out
            row = {"n": n, "dim": args.dim, "requested": kind, **build, "raw_mb": raw_mb,
                   "build_mem_over_raw": (build["rss_peak_mb"] - build["rss_before_mb"]) / raw_mb}
            row.update(query_figures(out, None, args.dim))
            results.append(row)
        if "flat" in outs:
            for row in results:
                if row["n"] == n and row["kind"] != "flat":
                    row.update(query_figures(outs[row["kind"]], outs["flat"], args.dim))
        for row in (r for r in results if r["n"] == n):
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    dest = ROOT / "benchmarks" / "results" / "index.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
