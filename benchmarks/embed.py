"""Embed-stage speed with the users' defaults: `clipcap embed` end to end vs the pure CLIP forward (the limit)
vs rom1504's `clip-retrieval inference` at its best batch size (the tool a user would pick instead), on the same
shards and weights.

    python benchmarks/embed.py                          # 1024 images, ViT-B-32 (seeded random weights), 8 shards
    python benchmarks/embed.py --images 4096 --per-shard 512 --peer-batches 32,64
    python benchmarks/embed.py --images 256 --models tiny --no-peer

For each model:
- the peer's sweep: one `clip-retrieval inference` run per ``--peer-batches`` size on ``--sweep-images`` images;
  the fastest batch is the one compared below;
- ours: `clipcap embed` with **no resource flags**, a new process as a user runs it (imports, Ray start, model
  load, decode, encode, commits all inside the wall time): images/s end to end, time to the first rows, and the
  steady rate the job reports (rows reaching the driver after the first 10%);
- clip-retrieval at its best batch, ``--rounds`` rounds alternating with ours (ABBA), so a drifting machine
  favours neither; the ratio is of the summed wall times;
- the pure forward (``encode_pixels`` on decoded, resized images, no Ray), before and after the runs, in our
  plan's layout (its concurrent batches x torch threads, parsed from the job's resources line) and with all
  cores as intra-op threads of one batch; steady / pure compares like with like.
Input: synthetic 256x256 JPEGs in img2dataset's webdataset layout, written before any clock starts. Random
weights have the FLOPs of the real ones (no model hub).
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

import numpy as np

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


def load_pixels(model: str, n: int, ckpt: Path | None = None, device: str = "cpu"):  # -> (encoder, uint8 (n,H,W,3))
    import numpy as np

    from clipcap_core import imaging, synthetic
    from clipcap_core.encoders import EncoderConfig, load_encoder

    enc = load_encoder(EncoderConfig(model_name=model, pretrained=str(ckpt) if ckpt else None), device=device,
                       precision="auto")
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
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(0, len(x), batch):
        enc.encode_pixels(x[i:i + batch])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(x) / (time.perf_counter() - t)


def pure_forward_concurrent(enc, x, batch: int, calls: int, threads: int = 1) -> float:
    """images/s of ``calls`` batches of ``batch`` in flight at once, each on ``threads`` torch threads: the layout
    of our CPU plan (one actor running several single-thread batches); torch releases the GIL in its kernels."""
    import threading

    import torch

    starts = list(range(0, len(x), batch))

    def work(first: int) -> None:
        torch.set_num_threads(threads)
        for i in starts[first::calls]:
            enc.encode_pixels(x[i:i + batch])

    pool = [threading.Thread(target=work, args=(j,)) for j in range(calls)]
    t = time.perf_counter()
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    return len(x) / (time.perf_counter() - t)


def plan_layout(plan: str) -> tuple[int, int]:
    """(batches at once, torch threads per batch) from our job's resources line (defaults: one core each)."""
    import re

    calls = re.search(r"(\d+) batches at once", plan) or re.search(r"(\d+) actor\(s\)", plan)
    threads = re.search(r"(\d+) torch thread", plan)
    return (int(calls.group(1)) if calls else os.cpu_count() or 1), (int(threads.group(1)) if threads else 1)


def save_checkpoint(model: str, path: Path) -> Path | None:
    """Seeded random open_clip weights as a state-dict file both tools load (None for our shipped presets)."""
    import torch

    from clipcap_core import encoders

    if model in ("tiny", "tiny-random"):
        return None
    torch.manual_seed(0)
    net = encoders._open_clip().create_model(model, pretrained=None)
    torch.save(net.state_dict(), path)
    return path


def run_ours(model: str, ckpt: Path | None, shards: Path, out: Path, extra: str = "") -> dict:
    """`clipcap embed` with default resources (plus ``extra`` flags) in a new process; its wall time and the
    figures it reports."""
    from benchmarks.clirun import run_clipcap

    wall, report, stderr, _ = run_clipcap("embed", "--input", str(shards), "--output", str(out), "--dataset",
                                          "bench", "--clip", model,
                                          *(["--clip-pretrained", str(ckpt)] if ckpt else []), *extra.split())
    plan = next((x.split("embed resources: ", 1)[1] for x in stderr.splitlines() if "embed resources: " in x), "")
    nan = float("nan")
    return {"wall_s": wall, "rows": report["rows"], "first_rows_s": report["first_rows_s"] or nan,
            "steady_img_s": report["steady_rows_per_s"] or nan, "plan": plan}


def sweep_peer(ckpt: Path, shards: Path, work: Path, model: str, batches: list[int]) -> dict[int, float]:
    """One clip-retrieval run per batch size of ``--peer-batches`` on the sweep shards: its images/s at each."""
    from benchmarks import peers

    rates = {}
    for b in batches:
        run = peers.run_clip_retrieval(shards, ckpt, work / f"sweep-{model}-{b}", batch_size=b,
                                       num_prepro_workers=peer_workers(shards), model=model)
        rates[b] = run["images_per_s"]
        print(f"[sweep] clip-retrieval batch {b}: {run['images_per_s']} img/s ({run['wall_s']} s)", flush=True)
    return rates


def peer_workers(shards: Path) -> int:
    return max(1, min(os.cpu_count() or 1, len(list(shards.glob("*.tar")))))


def pure_pair(enc, x, batch: int, layout: tuple[int, int]) -> tuple[float, float]:
    """(all cores as intra-op threads of one batch, the plan's layout of concurrent batches) images/s."""
    return pure_forward(enc, x, batch, os.cpu_count() or 1), pure_forward_concurrent(enc, x, batch, *layout)


def bench_model(model: str, shards: Path, sweep_shards: Path, work: Path, args: argparse.Namespace) -> dict:
    """The peer's batch sweep, then ``args.rounds`` rounds of ours and clip-retrieval at its best batch in ABBA
    order (ours, peer | peer, ours | ...): the machine's speed drifts during a run (a VM on a shared host), and
    alternating the order cancels a linear drift in the summed times."""
    ckpt = save_checkpoint(model, work / f"{model}.pt")
    enc, x = load_pixels(model, min(args.images, args.pure_images), ckpt, args.device)
    assumed = (os.cpu_count() or 1, 1)  # our CPU default on one node; checked against the job's plan line below
    pure_before = pure_pair(enc, x, args.batch_size, assumed)
    load_before = os.getloadavg()[0]
    with_peer = ckpt is not None and not args.no_peer
    batches = [int(b) for b in args.peer_batches.split(",") if b.strip()]
    sweep = sweep_peer(ckpt, sweep_shards, work, model, batches) if with_peer and len(batches) > 1 else {}
    peer_batch = max(sweep, key=sweep.get) if sweep else (batches or [args.batch_size])[0]
    ours_runs, peer_runs = [], []
    for i in range(args.rounds):
        order = ("ours", "peer") if i % 2 == 0 else ("peer", "ours")
        for who in order:
            if who == "ours":
                ours = run_ours(model, ckpt, shards, work / f"out-{model}-{i}", args.extra_flags)
                assert ours["rows"] == args.images, ours
                ours_runs.append(ours)
            elif with_peer:
                from benchmarks import peers

                peer_runs.append(peers.run_clip_retrieval(shards, ckpt, work / f"peer-{model}-{i}",
                                                          batch_size=peer_batch, num_prepro_workers=peer_workers(shards),
                                                          model=model))
    load_after = os.getloadavg()[0]
    layout = plan_layout(ours_runs[0]["plan"])
    pure_after = pure_pair(enc, x, args.batch_size, layout)
    if layout != assumed:  # the job ran another layout: its pure forward is the one measured after the runs
        pure_before = (pure_before[0], pure_after[1])
    pure_intra, pure_plan = ((a + b) / 2 for a, b in zip(pure_before, pure_after, strict=True))
    ours_wall = sum(r["wall_s"] for r in ours_runs)
    steady = float(np.median([r["steady_img_s"] for r in ours_runs]))
    row = {"model": model, "images": args.images, "rounds": args.rounds,
           "ours_wall_s": round(ours_wall / len(ours_runs), 1),
           "ours_img_s": round(args.images * len(ours_runs) / ours_wall, 2),
           "ours_first_rows_s": round(float(np.median([r["first_rows_s"] for r in ours_runs])), 1),
           "ours_steady_img_s": round(steady, 2), "pure_img_s": round(pure_plan, 2),
           "pure_intra_img_s": round(pure_intra, 2), "steady_over_pure": round(steady / pure_plan, 3),
           "steady_over_best_pure": round(steady / max(pure_plan, pure_intra), 3),
           "pure_layout": f"{layout[0]} batches x {layout[1]} thread(s)",
           "ours_walls_s": [round(r["wall_s"], 1) for r in ours_runs],
           "ours_first_rows_all_s": [round(r["first_rows_s"], 1) for r in ours_runs],
           "pure_before_after": [round(v, 2) for v in (*pure_before, *pure_after)],
           "loadavg_1m_before_after": [round(load_before, 1), round(load_after, 1)], "ours_plan": ours_runs[0]["plan"]}
    if sweep:
        row.update(peer_sweep_img_s=sweep, peer_best_batch=peer_batch)
    if peer_runs:
        peer_wall = sum(r["wall_s"] for r in peer_runs)
        row.update(peer_batch=peer_batch, peer_wall_s=round(peer_wall / len(peer_runs), 1),
                   peer_img_s=round(args.images * len(peer_runs) / peer_wall, 2),
                   ours_over_peer=round(peer_wall / ours_wall, 3),  # same images per run: a ratio of rates
                   round_ratios=[round(p["wall_s"] / o["wall_s"], 3) for o, p in zip(ours_runs, peer_runs, strict=True)],
                   peer_walls_s=[round(r["wall_s"], 1) for r in peer_runs], peer_command=peer_runs[0]["command"])
    return row


def parser() -> argparse.ArgumentParser:
    """This benchmark's flags (``tests/test_benchmarks.py`` checks ``gpu_check.sh``'s lines against it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--per-shard", type=int, default=128)
    p.add_argument("--models", default="ViT-B-32")
    p.add_argument("--batch-size", type=int, default=64, help="pure forward (our default: 64)")
    p.add_argument("--peer-batches", default="32,64,128,256",
                   help="clip-retrieval batch sizes swept before the ABBA rounds, which use the fastest ('': no "
                        "sweep: the peer runs at the one size given, else at --batch-size)")
    p.add_argument("--sweep-images", type=int, default=1024,
                   help="images of the peer's sweep (its own shards when fewer than --images)")
    p.add_argument("--pure-images", type=int, default=256, help="images per pure-forward pass (before + after)")
    p.add_argument("--no-peer", action="store_true", help="skip clip-retrieval")
    p.add_argument("--extra-flags", default="", help="flags added to `clipcap embed` (default: none)")
    p.add_argument("--device", default="cpu", help="pure forward device (cuda on a GPU machine)")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds of ours + clip-retrieval, alternating which goes first (ABBA; default 2)")
    p.add_argument("--json", help="also write the figures to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    p = parser()
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")

    with tempfile.TemporaryDirectory(prefix="clipcap-bench-") as tmp:
        shards = Path(tmp, "shards")
        shards.mkdir()
        write_shards(shards, args.images, args.per_shard)
        sweep_shards = shards
        if 0 < args.sweep_images < args.images:
            sweep_shards = Path(tmp, "sweep-shards")
            sweep_shards.mkdir()
            write_shards(sweep_shards, args.sweep_images, args.per_shard)
        rows = [bench_model(m, shards, sweep_shards, Path(tmp), args) for m in args.models.split(",")]
    print(f"\nembed benchmark: {args.images} images in shards of {args.per_shard}, {os.cpu_count()} CPU cores, "
          f"our default flags, {args.rounds} round(s) of ours and clip-retrieval in ABBA order (times: means)")
    cols = ["model", "ours_wall_s", "ours_img_s", "ours_first_rows_s", "ours_steady_img_s", "pure_img_s",
            "pure_intra_img_s", "steady_over_pure", "peer_batch", "peer_img_s", "ours_over_peer",
            "loadavg_1m_before_after"]
    print(" | ".join(f"{c:>17}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r.get(c, '-')!s:>17}" for c in cols))
        print(f"  our plan: {r['ours_plan']}; pure forward in that layout ({r['pure_layout']}) and all cores on one "
              f"batch, before / after: {r['pure_before_after']}")
        if "peer_sweep_img_s" in r:
            print(f"  clip-retrieval sweep ({args.sweep_images} images), img/s by batch: {r['peer_sweep_img_s']}; "
                  f"best {r['peer_best_batch']}")
        print(f"  per run: ours {r['ours_walls_s']} s" + (f", clip-retrieval {r['peer_walls_s']} s, per-round "
                                                          f"ratio {r['round_ratios']}" if "peer_walls_s" in r else ""))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
