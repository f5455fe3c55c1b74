"""Rendering speed of the two synthetic worlds (images/s, one process, one core): ``synthetic`` (one group) and
``scenes`` (two groups, a relation, gradient + noise backgrounds), drawn only and drawn + PNG-encoded (what
``write_url_list`` / ``write_webdataset`` pay per image), with each world's caption space.

    python benchmarks/worlds.py [--n 2000] [--size 64] [--output results/worlds.json]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="images per measurement")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--output", help="write the figures as JSON here")
    return ap


def rate(make: Callable[[], Iterable], png: bool) -> float:
    """Images/s of iterating ``make()`` (each item has ``.image``), optionally PNG-encoding each."""
    t0 = time.perf_counter()
    n = 0
    for s in make():
        if png:
            s.image.save(io.BytesIO(), format="PNG")
        n += 1
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    from clipcap_core import scenes, synthetic

    args = parser().parse_args(argv)
    worlds = {"synthetic": lambda: synthetic.generate(args.n, seed=0, size=args.size),
              "scenes": lambda: scenes.generate(args.n, seed=0, size=args.size)}
    out = {name: {"images_per_s": rate(make, False), "images_per_s_png": rate(make, True)}
           for name, make in worlds.items()}
    out["synthetic"]["captions"] = len(synthetic.all_captions())
    out["scenes"].update(scenes.caption_space())
    print(json.dumps(out, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
