"""Peak memory of a whole job for 1k vs 8k images: `clipcap embed` and `clipcap caption` with default flags.

    python benchmarks/memory.py                          # 1024 and 8192 images, tiny CLIP (+ untrained tiny LM)
    python benchmarks/memory.py --sizes 1024,8192 --model ViT-B-32

Each job runs as a user runs it, in a new process (which starts its own local Ray: GCS, raylet, workers, all
descendants of that process). Every 0.25 s the benchmark sums the **proportional set size** (PSS,
``/proc/<pid>/smaps_rollup``) of the job's whole process tree: shared pages (Ray's object store is shared
memory mapped by many workers, torch's libraries by every worker) are divided among the processes that map
them, so the sum is the memory the job really holds (RSS would count the object store once per worker). The
peak over the run is reported, with the 8k/1k ratio (target: within 10%, i.e. memory does not grow
with the input: shards / parts stream through and are committed one by one).
Inputs are written before the clock: webdataset shards of 128 synthetic 256 px JPEGs (embed) and tar archives
of 128 of them (caption: one part per archive). Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PER_UNIT = 128


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def tree_pss_bytes(root: int) -> int:
    """PSS of ``root`` and all its descendants, in bytes."""
    tree, todo, total = _children(), [root], 0
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:  # exited meanwhile
            continue
    return total


def run_measured(cmd: list[str], interval: float = 0.25) -> dict:
    from benchmarks.clirun import user_env

    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_pss_bytes(proc.pid))
            time.sleep(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    done.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:4])} failed ({proc.returncode}): {err[-3000:]}")
    return {"peak_pss_mb": round(peak[0] / 2**20, 1), "wall_s": round(time.perf_counter() - t, 1)}


def write_caption_archives(folder: Path, n: int) -> None:
    from clipcap_core import synthetic

    folder.mkdir(parents=True, exist_ok=True)
    for k, start in enumerate(range(0, n, PER_UNIT)):
        with tarfile.open(folder / f"a{k:05d}.tar", "w") as tf:
            for s in synthetic.generate(min(PER_UNIT, n - start), seed=3, size=256, start=start):
                buf = io.BytesIO()
                s.image.save(buf, format="JPEG", quality=90)
                info = tarfile.TarInfo(f"{s.key}.jpg")
                info.size = buf.tell()
                buf.seek(0)
                tf.addfile(info, buf)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.embed import write_shards

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1024,8192")
    p.add_argument("--model", default="tiny", help="CLIP for embed (caption uses the untrained tiny preset)")
    p.add_argument("--stages", default="embed,caption")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    from benchmarks.clirun import clipcap_command

    cli = clipcap_command()
    rows = []
    with tempfile.TemporaryDirectory(prefix="clipcap-bench-mem-") as tmp:
        for n in sizes:
            if "embed" in args.stages:
                shards = Path(tmp, f"shards-{n}")
                shards.mkdir()
                write_shards(shards, n, PER_UNIT)
                r = run_measured(cli + ["embed", "--input", str(shards), "--output", f"{tmp}/emb-{n}",
                                        "--dataset", "m", "--clip", args.model])
                rows.append({"stage": "embed", "images": n, **r})
                print(rows[-1], flush=True)
            if "caption" in args.stages:
                archives = Path(tmp, f"archives-{n}")
                write_caption_archives(archives, n)
                r = run_measured(cli + ["caption", "--input", str(archives), "--output", f"{tmp}/cap-{n}",
                                        "--model", "tiny", "--allow-untrained", "--max-length", "12"])
                rows.append({"stage": "caption", "images": n, **r})
                print(rows[-1], flush=True)
    print(f"\nmemory benchmark: peak PSS of the whole job's process tree, default flags, {os.cpu_count()} CPU cores")
    for stage in ("embed", "caption"):
        got = {r["images"]: r for r in rows if r["stage"] == stage}
        if len(got) >= 2:
            lo, hi = got[min(got)], got[max(got)]
            print(f"{stage:8s} " + " | ".join(f"{k} images: {v['peak_pss_mb']} MB in {v['wall_s']} s"
                                                for k, v in sorted(got.items()))
                  + f" | ratio {max(got)}/{min(got)}: {hi['peak_pss_mb'] / lo['peak_pss_mb']:.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
