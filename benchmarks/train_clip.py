"""CLIP training throughput: `train-clip` (Ray Train, 1 worker, streaming webdataset shards) vs a plain in-memory
open_clip loop on the same model, batch, optimizer and torch threads, side by side in one run.

    python benchmarks/train_clip.py                        # tiny, 4,096 synthetic pairs, batch 256, 2 epochs
    python benchmarks/train_clip.py --model tiny --pairs 8192 --epochs 3 --threads 2

- plain: images decoded and tokenised once up front into tensors, a shuffled slice per step (no data cost);
- ray: ``pipelines.clip.job.run_clip_training`` with its default data path (decode + tokenise in Ray Data
  tasks every epoch, streaming split, prefetch), no held-out evaluation, checkpoint per epoch.
Reported: pairs/s inside the training loop (the Ray run's logged step windows after its first, so start-up is
excluded; its end-to-end wall time is shown too) and the ratio ray / plain (target >= 0.8). The plain
loop runs before and after the Ray job (a shared machine is noisy); both are shown. Results also go to
``benchmarks/results/train_clip.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def plain_loop(shards: str, args: argparse.Namespace) -> float:
    import numpy as np
    import torch

    from clipcap_core.clip_training import (
        ClipModelSpec,
        ClipTrainConfig,
        build_clip,
        clip_loss,
        make_optimizer_and_scheduler,
        train_step,
    )
    from pipelines.clip import data as clip_data
    from pipelines.io import tables

    torch.set_num_threads(args.threads)
    prep = clip_data.PairPrep(model_name=args.model, size=64, augment="none",
                              split=tables.Split(part="all"))
    pixels, tokens, _ = clip_data.load_pairs(clip_data.list_shards(shards), prep)
    pixels = torch.from_numpy(pixels)
    hp = ClipTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=1e-3, warmup_steps=10, augment="none")
    model = build_clip(ClipModelSpec(model_name=args.model, from_scratch=True))
    n = len(tokens)
    steps = args.epochs * (n // args.batch_size)
    opt, sched = make_optimizer_and_scheduler(model, hp, steps)
    loss_fn = clip_loss(hp)
    t0, done = time.perf_counter(), 0
    for epoch in range(args.epochs):
        order = torch.from_numpy(np.random.default_rng(epoch).permutation(n))
        for s in range(0, n - args.batch_size + 1, args.batch_size):
            idx = order[s: s + args.batch_size]
            train_step(model, pixels[idx], tokens[idx], opt, sched, hp, loss_fn)
            done += len(idx)
            if epoch == 0 and s == 0:
                t0, done = time.perf_counter(), 0  # first step (allocations) excluded, as on the Ray side
    return done / (time.perf_counter() - t0)


def ray_run(shards: str, out: str, args: argparse.Namespace) -> tuple[float, float]:
    import numpy as np
    import ray

    from clipcap_core.clip_training import ClipModelSpec, ClipTrainConfig
    from pipelines.clip.job import ClipTrainJobConfig, run_clip_training
    from pipelines.train.state import RunOptions, ScaleConfig

    if not ray.is_initialized():
        ray.init(address=args.ray_address, log_to_driver=False)
    cfg = ClipTrainJobConfig(
        shards=(shards,), output=out, name="bench", heldout_fraction=0.0,
        model=ClipModelSpec(model_name=args.model, from_scratch=True),
        train=ClipTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=1e-3, warmup_steps=10,
                              augment="none"),
        run=RunOptions(log_every=4, checkpoint_every=10**6), scale=ScaleConfig(torch_threads=args.threads))
    t0 = time.perf_counter()
    result = run_clip_training(cfg)
    wall = time.perf_counter() - t0
    rates = [r["samples_per_s"] for r in result.history if r.get("kind") == "step"][1:]
    n_pairs = args.epochs * args.pairs
    return float(np.median(rates)), n_pairs / wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--pairs", type=int, default=4096)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ray-address", default=None)
    args = ap.parse_args()
    from clipcap_core import synthetic

    with tempfile.TemporaryDirectory(prefix="clipcap-bench-clip-") as d:
        shards = f"{d}/shards"
        synthetic.write_webdataset(shards, args.pairs, seed=11, shard_size=512)
        before = plain_loop(shards, args)
        ray_rate, ray_e2e = ray_run(shards, f"{d}/runs", args)
        after = plain_loop(shards, args)
    plain = max(before, after)
    res = {"model": args.model, "pairs": args.pairs, "batch": args.batch_size, "threads": args.threads,
           "plain_pairs_s": [round(before, 1), round(after, 1)], "ray_pairs_s": round(ray_rate, 1),
           "ray_end_to_end_pairs_s": round(ray_e2e, 1), "ratio_ray_over_plain": round(ray_rate / plain, 3)}
    print(json.dumps(res, indent=2))
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_clip.json").write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
