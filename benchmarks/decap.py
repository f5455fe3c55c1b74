"""DeCap's must-show figure: a captioner trained on synthetic captions only, on held-out synthetic images.

    python benchmarks/decap.py                          # tiny CLIP (EncoderConfig(model_name="tiny"))
    python benchmarks/decap.py --train-captions 4000 --heldout 300 --epochs 20 --noise-std 0.0

Runs the real stages: the training captions (text only, no image is rendered for them) -> ``embed-text`` (Ray
Data, CLIP text tower) -> ``train --decoder decap`` (Ray Train, tiny preset; memory = the training captions'
text embeddings) -> ``Captioner`` on held-out synthetic images. Prints three numbers side by side, on the same
held-out images:
- decap: exact-caption accuracy with the memory projection (the DeCap way);
- zero-shot: the CLIP's own retrieval top-1: per image, argmax over all 432 synthetic captions of cosine similarity;
- raw: exact-caption accuracy decoding the raw image embedding (``--projection none``).
Target: decap >= 0.8 x zero-shot, and clearly above raw. Meaningful only with an aligned CLIP
(image and text towers trained together); with random towers all three are near chance (1/432).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def zero_shot_top1(captioner, images, truth: list[str]) -> float:
    """Per image, the synthetic caption (of all 432) whose CLIP text embedding is most cosine-similar."""
    from clipcap_core.synthetic import all_captions

    captions = all_captions()
    text = captioner.encoder.encode_text(captions)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    img = captioner.embed_images(images)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    best = (img @ text.T).argmax(1)
    return float(np.mean([captions[i] == t for i, t in zip(best, truth, strict=True)]))


def exact(pred: list[str], truth: list[str]) -> float:
    from clipcap_core.metrics import normalize_caption

    return float(np.mean([normalize_caption(p) == normalize_caption(t) for p, t in zip(pred, truth, strict=True)]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="open_clip model name of the CLIP (default: tiny)")
    p.add_argument("--pretrained", help="its weights (tag, file or URI)")
    p.add_argument("--train-captions", type=int, default=3000)
    p.add_argument("--heldout", type=int, default=300)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--noise-std", type=float, default=0.0)
    p.add_argument("--tau", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", help="output folder (default: a temporary one)")
    args = p.parse_args(argv)
    import ray

    from clipcap_core import synthetic as syn
    from clipcap_core.captioner import Captioner
    from clipcap_core.decap import ProjectionConfig
    from clipcap_core.encoders import EncoderConfig
    from pipelines.embed.job import EmbedResources
    from pipelines.embed.text import EmbedTextConfig, run_embed_text

    root = args.root or tempfile.mkdtemp(prefix="clipcap-decap-bench-")
    ray.init(address=os.environ.get("RAY_ADDRESS", "local"), log_to_driver=False)  # never a stray cluster
    t0 = time.perf_counter()
    corpus = Path(root) / "corpus.txt"  # captions only: the generator's images are never rendered into it
    corpus.write_text("\n".join(s.caption for s in syn.generate(args.train_captions, seed=args.seed, size=8)) + "\n")
    encoder = EncoderConfig(model_name=args.model, pretrained=args.pretrained)
    table = run_embed_text(EmbedTextConfig(input=str(corpus), output_root=root, dataset="corpus", encoder=encoder,
                                           resources=EmbedResources(batch_size=256))).table_uri
    from pipelines.demo.run import train_decap

    trained = train_decap(table, root, seed=args.seed, epochs=args.epochs, noise_std=args.noise_std,
                          name=f"decap-bench-s{args.seed}")
    t_train = time.perf_counter() - t0
    held = list(syn.generate(args.heldout, seed=args.seed, size=64, start=1_000_000))  # never in the corpus
    images, truth = [s.image for s in held], [s.caption for s in held]
    cap = Captioner.from_pretrained(trained.artifact, projection=ProjectionConfig(tau=args.tau))
    emb = cap.embed_images(images)
    decap = exact(cap.caption(embeddings=emb, max_length=16), truth)
    raw_cap = Captioner.from_pretrained(trained.artifact, projection=ProjectionConfig(mode="none"))
    raw = exact(raw_cap.caption(embeddings=emb, max_length=16), truth)
    zero = zero_shot_top1(cap, images, truth)
    ok = decap >= 0.8 * zero and decap >= raw + 0.1
    print(f"\nDeCap on {args.heldout} held-out synthetic images (CLIP {encoder.model_name}"
          f"{'/' + args.pretrained if args.pretrained else ''}; text-only decoder trained on {args.train_captions} "
          f"captions, {args.epochs} epochs, noise_std {args.noise_std}, tau {args.tau}; {t_train:.0f} s to train)")
    print(f"{'decap (memory projection)':<32s}{'CLIP zero-shot top-1':<24s}{'raw image embedding':<22s}")
    print(f"{decap:<32.3f}{zero:<24.3f}{raw:<22.3f}")
    print(f"decap / zero-shot = {decap / zero if zero else float('nan'):.2f} (target >= 0.8); "
          f"decap - raw = {decap - raw:+.3f}: {'PASS' if ok else 'FAIL'}")
    print("RESULT " + json.dumps({"decap": decap, "zero_shot_top1": zero, "raw": raw, "heldout": args.heldout,
                                  "heldout_text_exact": trained.metrics.get("exact_match"), "pass": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
