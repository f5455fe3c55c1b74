"""Do the default flags learn? ``clipcap train`` with no flags but the tables and the preset, end to end, on the
data a new user has after ``make demo``:

1. ClipCap: ``clipcap train --input <demo embeddings> --model tiny`` -> held-out exact-caption rate (target >= 0.9);
2. DeCap: 3,000 synthetic captions -> ``clipcap embed-text`` -> ``clipcap train --decoder decap --model tiny`` ->
   ``clipcap caption`` of unseen images -> exact match, next to the tiny CLIP's zero-shot top-1 on the same
   images (target: >= 0.8x of it).

    python benchmarks/defaults.py                       # ~6 min on 2 cores; figures -> benchmarks/results/defaults.json

Training runs as the CLI (a subprocess, default flags); the data steps use the demo's own functions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CLIPCAP = [sys.executable, "-m", "pipelines.cli", "-v"]  # -v: the recipe line stays on stderr


def train(args: list[str]) -> dict:
    """``clipcap train ARGS`` (nothing else set); its printed summary."""
    t0 = time.perf_counter()
    out = subprocess.run(CLIPCAP + ["train", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    recipe = next((line for line in out.stderr.splitlines() if "train recipe" in line), "")
    return {**summary, "seconds": time.perf_counter() - t0, "recipe": recipe.split("train recipe", 1)[-1]}


def main() -> None:
    from clipcap_core import synthetic
    from clipcap_core.encoders import EncoderConfig, load_encoder
    from pipelines.clip.tiny import zero_shot_captions
    from pipelines.demo.run import (
        DemoConfig,
        caption_heldout,
        embed_captions,
        run_demo,
        step_embed,
        write_corpus,
    )

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="/tmp/clipcap-defaults")
    p.add_argument("--images", type=int, default=200, help="unseen images captioned by the DeCap model")
    args = p.parse_args()
    root, demo = args.root, DemoConfig(root=args.root)
    figures: dict = {}
    if not Path(root, "embeddings", "synthetic", "tiny").is_dir():
        run_demo(demo, steps=[step_embed])
    clipcap = train(["--input", f"{root}/embeddings/synthetic/tiny", "--output", f"{root}/runs",
                     "--name", "clipcap-defaults", "--model", "tiny"])
    figures["clipcap"] = {"heldout_exact": clipcap["metrics"]["exact_match"], "seconds": clipcap["seconds"],
                          "recipe": clipcap["recipe"]}
    print("clipcap train (default flags):", figures["clipcap"], flush=True)

    table = embed_captions(write_corpus(root, 3000, 0), root, EncoderConfig())
    decap = train(["--decoder", "decap", "--input", table, "--output", f"{root}/runs", "--name", "decap-defaults",
                   "--model", "tiny"])
    samples = list(synthetic.generate(args.images, seed=0, size=64, start=demo.samples))
    captioned = caption_heldout(root, decap["artifact"], samples, name="decap-defaults", show=0, echo=lambda _: None)
    clip = load_encoder(EncoderConfig())
    import numpy as np

    pixels = np.stack([clip.resize(s.image) for s in samples])
    zero = zero_shot_captions(clip, clip.encode_pixels(pixels), [s.caption for s in samples])["top1_exact"]
    figures["decap"] = {"unseen_exact": captioned["exact_match"], "clip_zero_shot_top1": zero,
                        "ratio": captioned["exact_match"] / zero if zero else None, "images": len(samples),
                        "seconds": decap["seconds"], "recipe": decap["recipe"]}
    print("clipcap train --decoder decap (default flags):", figures["decap"], flush=True)
    out = ROOT / "benchmarks" / "results" / "defaults.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
