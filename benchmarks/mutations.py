"""Proof that the quality test sees a worse model: plant one defect at a time in a temporary copy of the code, run
the quality recipe (``tests/quality/recipe.py``) there, and print held-out CIDEr per defect against the floors
of ``tests/quality/test_quality_floor.py``. The unmutated copy must pass; every mutation must fail.

    python benchmarks/mutations.py                       # all mutations, plus the real code first
    python benchmarks/mutations.py --only stop_token     # one of them
    python benchmarks/mutations.py --output results/mutations.json

Each mutation is one exact source replacement (the runner refuses to run when the text to replace is missing or
appears more than once, so a mutation cannot silently stop applying when the code moves). The copy holds the
files git tracks or would track (working-tree contents) and runs as its own process, so the real checkout is never touched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str  # the defect, in words
    path: str  # file relative to the repository root
    old: str
    new: str


MUTATIONS: tuple[Mutation, ...] = (
    Mutation("loss_mask_shift", "loss mask shifted one token right: the first word is never a target, one padding "
             "position after end-of-text is", "clipcap_core/training.py",
             "mask[i, : len(x)] = 1.0", "mask[i, 1: len(x) + 1] = 1.0"),
    Mutation("prefix_not_normalised", "the mapping ignores normalize_prefix: DeCap trains on raw text embeddings "
             "(norm ~15) and decodes unit memory projections", "clipcap_core/model.py",
             "if self.cfg.normalize_prefix:", "if False:"),
    Mutation("wrong_stop_token", "decoding stops at <unk> instead of end-of-text", "clipcap_core/decoding.py",
             "ids = [tokenizer.eos_token_id] if stop_at_eos else []",
             "ids = [tokenizer.unk_token_id] if stop_at_eos else []"),
    Mutation("mapping_reshape", "MLP output (B, k*E) viewed as (k, B, E) then transposed: each image's prefix "
             "vectors come from other rows of its batch", "clipcap_core/model.py",
             "return self.net(x).view(x.shape[0], self.k, self.lm_dim)",
             "return self.net(x).view(self.k, x.shape[0], self.lm_dim).transpose(0, 1)"),
    Mutation("captions_shuffled", "training batches pair each caption with the embedding of another key of the "
             "batch (embeddings taken in sorted-index order)", "clipcap_core/training.py",
             "[captions[i] for i in idx], embeddings[idx]", "[captions[i] for i in idx], embeddings[np.sort(idx)]"),
)


def copy_tree(dest: Path) -> None:
    """The files git tracks or would track (not ignored), as they are in the working tree, under ``dest``."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, check=True, capture_output=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def apply(root: Path, m: Mutation) -> None:
    path = root / m.path
    text = path.read_text()
    if text.count(m.old) != 1:
        raise SystemExit(f"mutation {m.name}: {m.old!r} occurs {text.count(m.old)} times in {m.path} (need 1)")
    path.write_text(text.replace(m.old, m.new))


def run_recipe(root: Path, seed: int) -> dict:
    """The recipe in a fresh process whose imports resolve to the copy under ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", "tests.quality.recipe", "--seed", str(seed)], cwd=root, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the recipe failed in {root}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=[m.name for m in MUTATIONS], help="these mutations only")
    ap.add_argument("--seed", type=int, default=0, help="the recipe's seed (the test runs seed 0)")
    ap.add_argument("--output", help="write the rows as JSON here")
    return ap


def main(argv: list[str] | None = None) -> int:
    from tests.quality.test_quality_floor import CIDER_FLOOR, DECAP_CIDER_FLOOR

    args = parser().parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    rows = []
    print(f"| code | ClipCap CIDEr (floor {CIDER_FLOOR:g}) | DeCap CIDEr (floor {DECAP_CIDER_FLOOR:g}) | quality "
          "test | recipe s |\n|---|---|---|---|---|", flush=True)
    for m in [None, *chosen]:
        with tempfile.TemporaryDirectory(prefix="clipcap-mutation-") as tmp:
            copy_tree(Path(tmp))
            if m is not None:
                apply(Path(tmp), m)
            res = run_recipe(Path(tmp), args.seed)
        passed = res["cider"] >= CIDER_FLOOR and res["decap_cider"] >= DECAP_CIDER_FLOOR
        row = {"mutation": m.name if m else "none (real code)", "what": m.what if m else "",
               "cider": res["cider"], "decap_cider": res["decap_cider"], "passes": passed, "code": res["code"],
               "seconds": res["seconds"]["total"], "examples": res["examples"]}
        rows.append(row)
        print(f"| {row['mutation']} | {row['cider']:.1f} | {row['decap_cider']:.1f} | "
              f"{'passes' if passed else 'FAILS'} | {row['seconds']:.0f} |", flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(rows, indent=1) + "\n")
    ok = rows[0]["passes"] and not any(r["passes"] for r in rows[1:])
    print("\nthe quality test " + ("sees every mutation" if ok else "DOES NOT see every mutation (or fails on the "
                                    "real code)"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
