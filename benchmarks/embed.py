"""Embed-stage throughput: the Ray pipeline against the bare model forward on the same images and batch.

    python benchmarks/embed.py                          # 1024 images; tiny preset and ViT-B-32 (random weights)
    python benchmarks/embed.py --images 256 --models ViT-B-32 --batch-size 32 --torch-threads 2

For each model it prints
- wall-clock images/s: ``run_embed`` from its call to the last committed table file (validation, pipeline and
  actor start-up, model load, decode, encode, writes; the one-off ``ray.init`` is timed apart);
- steady-state images/s: rows reaching the driver after the first ``--warmup-batches`` batches, per second
  (rows stream back in blocks of one or two batches);
- pure-forward images/s: ``encode_pixels`` of the same model, same torch threads and batch size, on the same
  images already decoded and resized, in this process, no Ray (after one warm-up batch); measured on
  ``--pure-images`` images right before and right after the pipeline run, mean of the two (a shared machine's
  load drifts; both are printed, with the 1-minute load average around the run);
- steady-state / pure-forward.
Input: 1024 synthetic 256x256 JPEGs in img2dataset's webdataset layout (``{key}.jpg/.txt/.json``, 4 shards),
written before the clock starts. Random weights have the FLOPs of the real ones (no model hub here).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_shards(folder: Path, n: int, per_shard: int, size: int = 256) -> None:
    from clipcap_core import synthetic

    for shard, start in enumerate(range(0, n, per_shard)):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for s in synthetic.generate(min(per_shard, n - start), seed=0, size=size, start=start):
                buf = io.BytesIO()
                s.image.save(buf, format="JPEG", quality=90)
                meta = json.dumps({"key": s.key, "url": f"http://example/{s.key}.jpg"}).encode()
                for ext, data in (("jpg", buf.getvalue()), ("txt", s.caption.encode()), ("json", meta)):
                    info = tarfile.TarInfo(f"{s.key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def steady_rate(timeline: list[tuple[float, int]], warmup_rows: int) -> float:
    """Rows per second from the first arrival after ``warmup_rows`` rows to the last one."""
    k = next((i for i, (_, rows) in enumerate(timeline) if rows >= warmup_rows), len(timeline))
    if k >= len(timeline) - 1:
        return float("nan")
    (t0, r0), (t1, r1) = timeline[k], timeline[-1]
    return (r1 - r0) / (t1 - t0) if t1 > t0 else float("nan")


def load_pixels(model: str, n: int):  # -> (encoder, uint8 (n, H, W, 3))
    import numpy as np

    from clipcap_core import synthetic
    from clipcap_core.encoders import EncoderConfig, load_encoder
    from pipelines import imaging

    enc = load_encoder(EncoderConfig(model_name=model))
    pixels = []
    for s in synthetic.generate(n, seed=0, size=256):  # the same JPEG bytes the pipeline decodes
        buf = io.BytesIO()
        s.image.save(buf, format="JPEG", quality=90)
        pixels.append(enc.resize(imaging.decode_image(buf.getvalue())))
    return enc, np.stack(pixels)


def pure_forward(enc, x, batch: int, threads: int) -> float:
    """images/s of ``enc.encode_pixels`` over ``x`` in batches (after one warm-up batch)."""
    import torch

    torch.set_num_threads(threads)
    enc.encode_pixels(x[:batch])
    t = time.perf_counter()
    for i in range(0, len(x), batch):
        enc.encode_pixels(x[i:i + batch])
    return len(x) / (time.perf_counter() - t)


def bench_model(model: str, shards: Path, out: Path, args: argparse.Namespace) -> dict:
    from clipcap_core.encoders import EncoderConfig
    from pipelines.embed import EmbedConfig, EmbedResources, run_embed

    enc, x = load_pixels(model, min(args.images, args.pure_images))
    # The machine may be shared: the pure forward runs right before and right after the pipeline, on the
    # same images, and the mean is the reference (both are reported).
    pure_before = pure_forward(enc, x, args.batch_size, args.torch_threads)
    load_before = os.getloadavg()[0]
    cfg = EmbedConfig(input=str(shards), output_root=str(out), dataset="bench", encoder=EncoderConfig(model_name=model),
                      resources=EmbedResources(batch_size=args.batch_size, torch_threads=args.torch_threads,
                                               num_actors=1, cpus_per_actor=1, decode_cpus=1))
    result = run_embed(cfg)
    assert result.rows == args.images, result
    load_after = os.getloadavg()[0]
    pure_after = pure_forward(enc, x, args.batch_size, args.torch_threads)
    steady = steady_rate(result.timeline, args.warmup_batches * args.batch_size)
    pure = (pure_before + pure_after) / 2
    return {"model": model, "images": result.rows, "wall_s": round(result.wall_s, 2),
            "wall_img_s": round(result.rows / result.wall_s, 2), "steady_img_s": round(steady, 2),
            "pure_forward_img_s": round(pure, 2), "steady_over_pure": round(steady / pure, 3),
            "pure_before_after": [round(pure_before, 2), round(pure_after, 2)],
            "loadavg_1m_before_after": [round(load_before, 1), round(load_after, 1)],
            "batch_size": args.batch_size, "torch_threads": args.torch_threads}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--per-shard", type=int, default=256)
    p.add_argument("--models", default="tiny,ViT-B-32")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads in the encoder actor and in the pure-forward loop (default: all cores)")
    p.add_argument("--warmup-batches", type=int, default=2)
    p.add_argument("--pure-images", type=int, default=256, help="images per pure-forward pass (before + after)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)

    import ray

    with tempfile.TemporaryDirectory(prefix="clipcap-bench-") as tmp:
        shards, out = Path(tmp, "shards"), Path(tmp, "out")
        shards.mkdir()
        write_shards(shards, args.images, args.per_shard)
        t = time.perf_counter()
        ray.init(address="local", log_to_driver=False, include_dashboard=False)
        ray_init_s = time.perf_counter() - t
        ray.data.DataContext.get_current().enable_progress_bars = False
        rows = [bench_model(m, shards, out, args) for m in args.models.split(",")]
        ray.shutdown()
    print(f"\nembed benchmark: {args.images} images, {os.cpu_count()} CPU cores, ray.init {ray_init_s:.1f}s (not in wall)")
    cols = ["model", "wall_s", "wall_img_s", "steady_img_s", "pure_forward_img_s", "steady_over_pure",
            "pure_before_after", "loadavg_1m_before_after"]
    print(" | ".join(f"{c:>18}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]!s:>18}" for c in cols))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"ray_init_s": ray_init_s, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
