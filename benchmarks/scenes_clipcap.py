"""ClipCap on the ``scenes`` world with the ``tiny-scenes`` CLIP: per attribute, seen vs held-out colour-shape
combinations, over seeds.

    python benchmarks/scenes_clipcap.py                        # the table in RESULTS.md (seeds 0 1 2)
    python benchmarks/scenes_clipcap.py --seeds 0 --train 512 --heldout 100 --root /tmp/sc   # a quick look

Runs the user's path per seed, each step a ``clipcap`` process of its own (``benchmarks/clirun.py``), from scratch:
1. ``--train`` scenes of the ``train`` split (no held-out combination; the seed picks them) as webdataset shards,
   each with its canonical caption;
2. ``clipcap embed --clip tiny-scenes`` on them;
3. ``clipcap train --model tiny --seed S`` on that table (the preset's own recipe; it holds out its key-hash share);
4. ``--heldout`` images (drawn by ``--heldout-seed``, the same for every seed, or with -1 by each seed; half ``test``: unseen scenes of seen
   combinations, half ``novel``: one held-out colour-shape combination each), captioned by ``clipcap caption``;
5. ``clipcap evaluate`` against the six references per image: exact match (any reference) and CIDEr, and the
   parsed scores (``worlds.scenes_accuracy``: exact in any wording, count / size / colour / shape of both groups,
   relation), each overall and per half.
Also the CLIP's own zero-shot image->caption top-1 on each half's images (``tiny_scenes.zero_shot_scenes``: among
the canonical captions of those images). Last: mean and spread (max - min) over the seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.clirun import run_clipcap  # noqa: E402
from benchmarks.scenes_eval import HALVES, attribute_accuracy, per_half, write_heldout  # noqa: E402

CLIP = "tiny-scenes"
ATTRIBUTES = ("exact", "count", "size", "color", "shape", "relation")


def zero_shot(n: int, seed: int) -> dict[str, float]:
    """``tiny-scenes`` top-1 on the held-out images of each half (the ``test`` / ``novel`` samples of ``seed``)."""
    from clipcap_core.encoders import EncoderConfig, load_encoder
    from pipelines.clip.tiny_scenes import zero_shot_scenes

    enc = load_encoder(EncoderConfig(model_name=CLIP))
    return {half: zero_shot_scenes(enc, split, n=n, seed=seed)["top1"]
            for half, split in (("seen_combos", "test"), ("novel_combos", "novel"))}


def run_seed(root: Path, seed: int, n_train: int, n_heldout: int, heldout_seed: int | None = None) -> dict:
    """One seed, start to end (see the module doc); returns its figures and step walls."""
    from clipcap_core import scenes

    root.mkdir(parents=True, exist_ok=True)
    walls: dict[str, float] = {}
    shards = root / "shards"
    scenes.write_webdataset(shards, n_train, seed=seed, split="train", shard_size=512)
    walls["embed"], emb, _, _ = run_clipcap(
        "embed", "--input", str(shards), "--output", str(root), "--dataset", "scenes", "--clip", CLIP)
    table = emb.get("table_uri") or str(root / "embeddings" / "scenes" / CLIP)
    walls["train"], trained, _, _ = run_clipcap(
        "train", "--model", "tiny", "--input", table, "--output", str(root / "runs"), "--name", "clipcap-scenes",
        "--seed", str(seed))
    artifact = trained.get("artifact") or str(root / "runs" / "clipcap-scenes" / "model")
    heldout_seed = seed if heldout_seed is None else heldout_seed
    archive, refs, samples = write_heldout(root, n_heldout, heldout_seed)
    out, ev = root / "captions", root / "eval"
    walls["caption"], _, _, _ = run_clipcap("caption", "--input", str(archive), "--output", str(out),
                                            "--model", artifact, "--show", "0")
    walls["evaluate"], summary, _, _ = run_clipcap(
        "evaluate", "--predictions", str(out), "--references", str(refs), "--output", str(ev),
        "--metrics", "bleu,cider", "--tokenize", "simple", "--json")
    halves = per_half(ev)
    figures = {"all": {"exact_match": summary["metrics"]["exact_match"], "cider": summary["metrics"]["cider"],
                       **attribute_accuracy(ev, samples)}}
    for half, prefix in HALVES.items():
        figures[half] = {k: v for k, v in halves[half].items() if k != "n"} | attribute_accuracy(ev, samples, prefix)
    return {"seed": seed, "figures": figures, "zero_shot_top1": zero_shot(n_heldout - n_heldout // 2, heldout_seed),
            "wall_s": {k: round(v, 1) for k, v in walls.items()}}


def summarise(runs: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """(mean, max - min) over the seeds of every figure, in percent."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for part in runs[0]["figures"]:
        for k in runs[0]["figures"][part]:
            v = np.array([100 * r["figures"][part][k] for r in runs])
            out.setdefault(part, {})[k] = (float(v.mean()), float(v.max() - v.min()))
    for half in HALVES:
        v = np.array([100 * r["zero_shot_top1"][half] for r in runs])
        out[half]["clip_zero_shot_top1"] = (float(v.mean()), float(v.max() - v.min()))
    return out


def print_table(runs: list[dict], summary: dict) -> None:
    cols = ("exact_match", "cider", *ATTRIBUTES)
    print("| seed | combinations | exact match (any ref) | CIDEr | exact (parsed) | count | size | colour | shape | "
          "relation | CLIP zero-shot top-1 |")
    print("|---|---|" + "---|" * (len(cols) + 1))
    for r in runs:
        for part in ("seen_combos", "novel_combos", "all"):
            f = r["figures"][part]
            zs = f"{100 * r['zero_shot_top1'][part]:.1f}" if part in HALVES else ""
            print(f"| {r['seed']} | {part} | " + " | ".join(f"{100 * f[k]:.1f}" for k in cols) + f" | {zs} |")
    for part in ("seen_combos", "novel_combos", "all"):
        s = summary[part]
        zs = s.get("clip_zero_shot_top1")
        print(f"| mean (spread) | {part} | " + " | ".join(f"{s[k][0]:.1f} ({s[k][1]:.1f})" for k in cols)
              + (f" | {zs[0]:.1f} ({zs[1]:.1f}) |" if zs else " | |"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train", type=int, default=8192, help="training scenes per seed (images embedded)")
    p.add_argument("--heldout", type=int, default=2000, help="held-out images (half test, half novel)")
    p.add_argument("--heldout-seed", type=int, default=100,
                   help="seed of the one held-out set every seed is evaluated on (the spread is then the training's "
                        "alone); -1: each seed draws its own")
    p.add_argument("--root", help="output folder (default: a temporary one)")
    args = p.parse_args(argv)

    root = Path(args.root or tempfile.mkdtemp(prefix="clipcap-scenes-clipcap-")).resolve()
    t0 = time.perf_counter()
    heldout_seed = None if args.heldout_seed < 0 else args.heldout_seed
    runs = [run_seed(root / f"seed{s}", s, args.train, args.heldout, heldout_seed) for s in args.seeds]
    summary = summarise(runs)
    print(f"\nClipCap (tiny preset) on scenes, CLIP {CLIP}: {args.train} training scenes, {args.heldout} held-out images "
          f"(half seen combinations, half held out), seeds {args.seeds}; figures in %")
    print_table(runs, summary)
    print("RESULT " + json.dumps({"clip": CLIP, "train": args.train, "heldout": args.heldout, "runs": runs,
                                  "summary": summary, "total_s": round(time.perf_counter() - t0, 1),
                                  "root": str(root)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
