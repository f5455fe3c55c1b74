"""DeCap's claim on the ``scenes`` world with the gapped CLIP: memory projection vs the raw image embedding.

    python benchmarks/decap_scenes.py                                  # the figures in RESULTS.md
    python benchmarks/decap_scenes.py --corpus 4000 --heldout 200 --epochs 3 --root /tmp/ds   # a quick look

Runs the user's path, each step a ``clipcap`` process of its own (``benchmarks/clirun.py``), from scratch:
1. a caption corpus: ``--corpus`` captions of ``split="train"`` scenes (text only, one of each scene's six
   wordings, no image rendered into it; the held-out colour-shape combinations never occur);
2. ``clipcap embed-text --clip tiny-scenes-gapped`` on it;
3. ``clipcap train --decoder decap --model tiny`` on that table (memory: the default 10,000 training captions);
4. held-out images written by the scenes generator (half ``test``: unseen scenes of seen combinations, half
   ``novel``: one held-out colour-shape combination each, as ``clipcap demo --world scenes`` holds out) into a tar,
   captioned twice by ``clipcap caption``: the model's own projection (``auto`` = memory) and ``--projection none``;
5. ``clipcap evaluate`` of each against the six references per image: exact match (any reference) and CIDEr,
   overall and per half.
Also the modality gap (``clip_eval.modality_gap``) of the held-out images' embeddings vs their canonical
captions' text embeddings, before and after the memory projection (the projected vector vs the text embedding).
Target (issue 23): projection >= raw + 10 points of exact match, or CIDEr >= 1.3x raw.
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
from benchmarks.scenes_eval import attribute_accuracy, per_half, write_heldout  # noqa: E402

GAPPED = "tiny-scenes-gapped"


def write_corpus(path: Path, n: int, seed: int) -> None:
    """``n`` training-split scenes, each said in one of its six wordings (seeded): text only."""
    from pipelines.demo.worlds import scenes_corpus

    path.write_text("\n".join(scenes_corpus(n, seed)) + "\n")


def gap_figures(artifact: str, samples: list) -> dict[str, dict[str, float]]:
    """Modality gap of (image, canonical caption) pairs, raw and after the artifact's memory projection."""
    from clipcap_core.captioner import Captioner
    from clipcap_core.clip_eval import modality_gap

    cap = Captioner.from_pretrained(artifact)
    img = cap.embed_images([s.image for s in samples])
    txt = np.asarray(cap.encoder.encode_text([s.caption for s in samples]), dtype=np.float32)
    projected = cap.decap.project(img)
    projected = projected.cpu().numpy() if hasattr(projected, "cpu") else np.asarray(projected)
    keep = ("paired_cosine", "centroid_distance", "gap_variance_share")
    return {name: {k: round(v, 4) for k, v in modality_gap(x, txt).items() if k in keep}
            for name, x in (("raw", img), ("projected", projected))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=int, default=20000, help="training captions (text only)")
    p.add_argument("--heldout", type=int, default=400, help="held-out images (half test, half novel)")
    p.add_argument("--epochs", type=int, default=6, help="clipcap train --epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip", default=GAPPED, help="the CLIP (tiny-scenes: the same without a modality gap)")
    p.add_argument("--root", help="output folder (default: a temporary one)")
    args = p.parse_args(argv)

    root = Path(args.root or tempfile.mkdtemp(prefix="clipcap-decap-scenes-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    walls: dict[str, float] = {}
    t0 = time.perf_counter()
    corpus = root / "corpus.txt"
    write_corpus(corpus, args.corpus, args.seed)
    walls["embed-text"], emb, _, _ = run_clipcap(
        "embed-text", "--input", str(corpus), "--output", str(root), "--dataset", "scenes-corpus", "--clip", args.clip)
    table = emb.get("table_uri") or str(root / "text-embeddings" / "scenes-corpus" / args.clip)
    walls["train"], trained, _, _ = run_clipcap(
        "train", "--decoder", "decap", "--model", "tiny", "--input", table, "--output", str(root / "runs"),
        "--name", "decap-scenes", "--epochs", str(args.epochs), "--seed", str(args.seed))
    artifact = trained.get("artifact") or str(root / "runs" / "decap-scenes" / "model")
    archive, refs, samples = write_heldout(root, args.heldout, args.seed)
    results: dict[str, dict] = {}
    for mode in ("memory", "none"):
        out, ev = root / "captions" / mode, root / "eval" / mode
        walls[f"caption-{mode}"], _, _, _ = run_clipcap(
            "caption", "--input", str(archive), "--output", str(out), "--model", artifact,
            *(["--projection", "none"] if mode == "none" else []), "--show", "0")
        walls[f"evaluate-{mode}"], summary, _, _ = run_clipcap(
            "evaluate", "--predictions", str(out), "--references", str(refs), "--output", str(ev),
            "--metrics", "bleu,cider", "--tokenize", "simple", "--json")
        ms = summary["metrics"]
        results[mode] = {"exact_match": ms["exact_match"], "cider": ms["cider"], "bleu4": ms["bleu4"],
                         "evaluated": summary["evaluated"], **per_half(ev),
                         "parsed": attribute_accuracy(ev, samples)}
    gap = gap_figures(artifact, samples)
    proj, raw = results["memory"], results["none"]
    ok = proj["exact_match"] >= raw["exact_match"] + 0.10 or proj["cider"] >= 1.3 * raw["cider"]
    report = {"clip": args.clip, "corpus": args.corpus, "heldout": args.heldout, "epochs": args.epochs, "seed": args.seed,
              "projection": proj, "raw": raw, "gap": gap, "target_met": ok,
              "wall_s": {k: round(v, 1) for k, v in walls.items()},
              "total_s": round(time.perf_counter() - t0, 1), "root": str(root)}
    print(f"\nDeCap on scenes, CLIP {args.clip}: {args.corpus} training captions, {args.epochs} epochs, "
          f"{args.heldout} held-out images (half seen combinations, half novel)")
    print("| decoding | exact match | CIDEr | BLEU-4 | exact seen / novel | CIDEr seen / novel |")
    print("|---|---|---|---|---|---|")
    for name, r in (("memory projection", proj), ("raw image embedding", raw)):
        s, n = r["seen_combos"], r["novel_combos"]
        print(f"| {name} | {100 * r['exact_match']:.1f} | {100 * r['cider']:.1f} | {100 * r['bleu4']:.1f} | "
              f"{100 * s['exact_match']:.1f} / {100 * n['exact_match']:.1f} | "
              f"{100 * s['cider']:.1f} / {100 * n['cider']:.1f} |")
    print("| decoding (parsed, any wording) | exact | count | size | colour | shape | relation |")
    print("|---|---|---|---|---|---|---|")
    for name, r in (("memory projection", proj), ("raw image embedding", raw)):
        a = r["parsed"]
        print(f"| {name} | " + " | ".join(f"{100 * a[k]:.1f}" for k in ("exact", "count", "size", "color", "shape",
                                                                           "relation")) + " |")
    print("| vectors vs caption text embedding | paired cosine | centroid distance | gap variance share |")
    print("|---|---|---|---|")
    for name, g in gap.items():
        print(f"| {name} | {g['paired_cosine']:.3f} | {g['centroid_distance']:.3f} | {g['gap_variance_share']:.3f} |")
    print(f"target (projection >= raw + 10 points exact, or CIDEr >= 1.3x): {'MET' if ok else 'NOT MET'}")
    print("RESULT " + json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
