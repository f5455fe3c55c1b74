"""Training throughput: the Ray Train job (1 worker, streaming Parquet) vs a plain in-memory PyTorch loop.

    python benchmarks/train.py                       # 40k rows, D=512, tiny preset, batch 64, 2 epochs
    python benchmarks/train.py --rows 100000 --threads 2 --ray-address auto

Both sides train the same model (same preset, seed, D, batch size, optimizer) on the same rows:
- ray: ``pipelines.train.job.run_training`` with 1 worker reading the Parquet tables through Ray Data
  (tokenisation in the pipeline, prefetch), checkpoints each epoch, no held-out evaluation, and the job's
  default resources (``runner.size_workers``; the plan line is printed);
- plain: captions tokenised once up front, tensors in memory, a shuffled slice per step (no data cost at all),
  on the job's torch threads: the streaming job's cost against no data path at all (target >= 0.9);
- the limit: the plain loop once more on torch's default threads (every core), where the job leaves a core
  to its data tasks and to Ray.
``--threads N`` sets both sides' threads. On a machine with a GPU both sides train on it.
Reported: samples/s inside the training loop (per-epoch wall time, so the stream's start, paid once in the
first epoch, is included), their ratio (target >= 0.9); the steady ratio (epochs after the first) and the
stream's start (the first epoch's wait for its first batch: Ray Data's executor, stats actor and read-task
process start), which together explain it; and the Ray job's end-to-end rate including cluster and worker
start-up. Results also go to ``benchmarks/results/train.json``. CPU numbers on a shared machine are
noisy: the plain loop runs before and after the Ray job and both runs are shown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def plain_loop(files: list[str], args: argparse.Namespace, threads: int) -> float:
    """Samples/s of an in-memory loop on ``threads`` torch threads: pre-tokenised tensors, a random permutation
    per epoch."""
    import numpy as np
    import torch

    from clipcap_core.training import TrainConfig, make_optimizer_and_scheduler, train_step
    from pipelines.io import tables
    from pipelines.train.setup import BatchTokenizer, build_or_load_model, resolve_model_config, to_core_batch

    torch.set_num_threads(threads)
    info = tables.inspect_tables(files)
    hp = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=1e-3, warmup_steps=10,
                     max_caption_tokens=args.max_tokens)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # like the job's default: the GPU when there is one
    model, tok = build_or_load_model(args.model, resolve_model_config(args.model, {}, info), seed=0, device=device)
    table = tables.read_split(files, tables.Split(part="train", heldout_fraction=0.0))
    tokens, mask = BatchTokenizer(tok, args.max_tokens)(table.column("caption").to_pylist())
    pad = args.max_tokens - tokens.shape[1]  # same padded width as the Ray pipeline; trimmed per batch
    data = {"embedding": torch.from_numpy(tables.embeddings_numpy(table).copy()),
            "tokens": torch.from_numpy(np.pad(tokens, ((0, 0), (0, pad)))),
            "mask": torch.from_numpy(np.pad(mask, ((0, 0), (0, pad))))}
    data = {k: v.to(device) for k, v in data.items()}
    n = len(tokens)
    opt, sched = make_optimizer_and_scheduler(model, hp, args.epochs * -(-n // args.batch_size))
    rates = []
    for epoch in range(args.epochs):
        order = torch.from_numpy(np.random.default_rng(epoch).permutation(n)).to(device)
        t0 = time.perf_counter()
        for s in range(0, n, args.batch_size):
            idx = order[s: s + args.batch_size]
            train_step(model, to_core_batch({k: v[idx] for k, v in data.items()}), opt, sched, hp)
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t0))
    return float(np.mean(rates))


def ours_threads(args: argparse.Namespace) -> tuple[int, int]:
    """(torch threads the Ray job's worker will run, torch's default here), before Ray starts: the job's own
    sizing (``runner.size_workers``) of this machine as the local Ray instance sees it."""
    import torch

    from pipelines.runtime import ClusterShape
    from pipelines.train.runner import size_workers
    from pipelines.train.state import ScaleConfig

    default = torch.get_num_threads()
    if args.threads:
        return args.threads, default
    from ray._private.utils import get_num_cpus  # what a local instance registers (cgroup limits included)

    cpus = float(get_num_cpus())
    sized = size_workers(ScaleConfig(num_workers=1), ClusterShape(cpus, float(torch.cuda.device_count()), (cpus,)))
    return sized.torch_threads or default, default


def ray_job(files: list[str], args: argparse.Namespace, workdir: str) -> dict[str, float]:
    import numpy as np
    import ray

    from clipcap_core.training import TrainConfig
    from pipelines.train.job import TrainJobConfig, run_training
    from pipelines.train.state import RunOptions, ScaleConfig

    if not ray.is_initialized():
        ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False)
    from pipelines.runtime import ClusterShape
    from pipelines.train.runner import describe_workers, size_workers

    cluster = ClusterShape.from_ray()  # the plan run_training logs (its log line goes to the driver's logger)
    print("  " + describe_workers(size_workers(ScaleConfig(num_workers=1, torch_threads=args.threads), cluster),
                                  cluster))
    job = TrainJobConfig(
        tables=tuple(files), output=os.path.join(workdir, "runs"), name="bench", model=args.model,
        heldout_fraction=0.0,
        train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=1e-3, warmup_steps=10,
                          max_caption_tokens=args.max_tokens),
        run=RunOptions(checkpoint_every=10**9, log_every=10**9, prefetch_batches=args.prefetch),
        scale=ScaleConfig(num_workers=1, torch_threads=args.threads))
    t0 = time.perf_counter()
    result = run_training(job)
    wall = time.perf_counter() - t0
    epochs = [r for r in result.history if r["kind"] == "epoch"]
    for r in epochs:
        print(f"  ray epoch {r['epoch']}: {r['samples']} samples in {r['seconds']:.1f} s "
              f"({r['samples_per_s']:.0f}/s), {r['data_wait_s']:.1f} s waiting for data")
    rows = sum(r.get("samples", 0) for r in epochs) or args.rows * args.epochs
    steady = [r["samples_per_s"] for r in epochs[1:]]
    return {"in_loop": float(np.mean([r["samples_per_s"] for r in epochs])),
            "steady": float(np.mean(steady)) if steady else float("nan"),
            "stream_start_s": epochs[0]["data_wait_s"] if epochs else float("nan"),
            "end_to_end": rows / wall, "wall_s": wall,
            "data_wait_fraction": sum(r["data_wait_s"] for r in epochs) / sum(r["seconds"] for r in epochs)}


def parser() -> argparse.ArgumentParser:
    """This benchmark's flags (``tests/test_benchmarks.py`` checks ``gpu_check.sh``'s lines against it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=40_000)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads on both sides (default: each side's own default, as users run it)")
    p.add_argument("--prefetch", type=int, default=4)
    p.add_argument("--ray-address", default=None, help="default: a local Ray instance")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/train.json"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from pipelines.demo import synthetic_tables

    threads, default_threads = ours_threads(args)
    with tempfile.TemporaryDirectory(prefix="clipcap-bench-train-") as workdir:
        files = synthetic_tables.write_synthetic_tables(workdir, args.rows, shards=args.shards, dim=args.dim)
        plain_before = plain_loop(files, args, threads)
        ray_rates = ray_job(files, args, workdir)
        plain_after = plain_loop(files, args, threads)
        # the limit a hand-written loop reaches: every core (where the job leaves one to its data and Ray)
        limit = plain_loop(files, args, default_threads) if default_threads != threads else None
    plain = (plain_before + plain_after) / 2
    ratio = ray_rates["in_loop"] / plain
    steady_ratio = ray_rates["steady"] / plain
    result = {"rows": args.rows, "dim": args.dim, "model": args.model, "batch_size": args.batch_size,
              "epochs": args.epochs, "threads": threads, "plain_before": plain_before,
              "plain_after": plain_after, "plain_all_cores": limit, "all_cores_threads": default_threads,
              "ray_in_loop": ray_rates["in_loop"],
              "ray_steady": ray_rates["steady"], "ray_stream_start_s": ray_rates["stream_start_s"],
              "ray_end_to_end": ray_rates["end_to_end"], "ray_wall_s": ray_rates["wall_s"],
              "ray_data_wait_fraction": ray_rates["data_wait_fraction"], "ratio": ratio,
              "steady_ratio": steady_ratio}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"plain in-memory loop, the job's {threads} torch thread(s): {plain:.0f} samples/s (before "
          f"{plain_before:.0f}, after {plain_after:.0f})")
    if limit:
        print(f"plain in-memory loop, all {default_threads} torch threads (the limit): {limit:.0f} samples/s")
    print(f"ray train, 1 worker, streaming parquet: {ray_rates['in_loop']:.0f} samples/s in the loop, "
          f"{ray_rates['end_to_end']:.0f} samples/s end to end ({ray_rates['wall_s']:.1f} s incl. start-up); "
          f"{100 * ray_rates['data_wait_fraction']:.0f}% of loop time waiting for data")
    print(f"ratio (ray in-loop / plain): {ratio:.2f} (target >= 0.9); steady (epochs after the first): "
          f"{steady_ratio:.2f}; the first epoch's wait for data (mostly the stream's start): "
          f"{ray_rates['stream_start_s']:.1f} s")
    if limit:
        print(f"ray in-loop / the all-core plain loop: {ray_rates['in_loop'] / limit:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
