"""The decoding study (``clipcap study decoding``'s table) on the ``scenes`` world in one command: the quality
recipe's ClipCap (``tests/quality/recipe.py``: tiny preset, ``tiny-scenes`` CLIP, seeded, trained in this process)
captions ``--heldout`` unseen scenes greedily, by beam search, by nucleus sampling and by n samples + CLIP rerank;
images/s of each (one torch thread, fastest of ``--repeats`` runs) and its metrics against the six references of each image.

    python benchmarks/decoding_study.py [--heldout 256] [--epochs 10] [--output results/decoding.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heldout", type=int, default=256, help="unseen test scenes captioned")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5, help="decode each strategy this often, keep the fastest")
    ap.add_argument("--output", help="write the Markdown table here too")
    return ap


def main(argv: list[str] | None = None) -> int:
    import torch

    from clipcap_core.encoders import EncoderConfig, load_encoder
    from clipcap_core.metrics import ClipScorer
    from pipelines.evaluate.decoding_study import DecodingOptions, decoding_study, format_table
    from tests.quality import recipe

    args = parser().parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    data = recipe.scenes_data(n_heldout=args.heldout, seed=args.seed)
    model, tok = recipe.train_captioner(data.train_image, data.train_captions, args.seed, epochs=args.epochs)
    print(f"trained in {time.perf_counter() - t0:.0f} s", flush=True)
    scorer = ClipScorer(load_encoder(EncoderConfig(model_name="tiny-scenes")))
    rows = decoding_study(model, tok, data.heldout_image, data.heldout_refs,
                          DecodingOptions(max_length=recipe.MAX_TOKENS, rerank_n=(5, 10), repeats=args.repeats), scorer)
    table = format_table(rows)
    print(table)
    for r in rows:
        print(f"  {r['strategy']}: {r['example']}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
