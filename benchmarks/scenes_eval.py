"""Held-out ``scenes`` images and their scores, shared by the scenes benchmarks (``decap_scenes.py``,
``scenes_clipcap.py``): the archive ``clipcap caption`` reads, the references ``clipcap evaluate`` reads, and the
figures of an evaluation folder, overall and per half (seen colour-shape combinations / held-out ones)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Key prefixes of the two halves (``scenes.sample_key``): ``test`` = unseen scenes of seen combinations,
# ``novel`` = one held-out colour-shape combination per image.
HALVES = {"seen_combos": "scnte", "novel_combos": "scnno"}


def write_heldout(root: Path, n: int, seed: int) -> tuple[Path, Path, list]:
    """Half ``test``, half ``novel`` scenes -> ``heldout.tar`` of PNGs and ``references.jsonl`` (key, caption)."""
    from pipelines.demo.run import write_archive
    from pipelines.demo.worlds import world

    samples = world("scenes").heldout(n, seed, 0)
    archive = root / "archives" / "heldout.tar"
    write_archive(str(archive), samples)
    refs = root / "references.jsonl"
    refs.write_text("".join(json.dumps({"key": s.key, "caption": c}) + "\n" for s in samples for c in s.references))
    return archive, refs, samples


def per_half(eval_dir: Path) -> dict[str, dict[str, float]]:
    """Mean exact match and CIDEr of each half from ``clipcap evaluate``'s ``per_image.parquet``."""
    import pyarrow.parquet as pq

    rows = pq.read_table(eval_dir / "per_image.parquet").to_pylist()
    out = {}
    for half, prefix in HALVES.items():
        sel = [r for r in rows if Path(str(r["image_id"])).name.startswith(prefix)]
        out[half] = {"n": len(sel), "exact_match": float(np.mean([r["exact_match"] for r in sel])),
                     "cider": float(np.mean([r["cider"] for r in sel]))}
    return out


def attribute_accuracy(eval_dir: Path, samples: list, prefix: str = "") -> dict[str, float]:
    """The scenes world's parse-based scores of the evaluated captions (``worlds.scenes_accuracy``: exact in any
    wording, count / size / colour / shape of both groups, relation), from ``results.json``; ``prefix``: only the
    samples whose key starts with it (one half)."""
    from pipelines.demo.worlds import scenes_accuracy

    predicted = {Path(str(r["image_id"])).name: r["caption"]
                 for r in json.loads((eval_dir / "results.json").read_text())}
    chosen = [s for s in samples if s.key.startswith(prefix)]
    scores = scenes_accuracy([predicted.get(s.key, "") for s in chosen], [s.caption for s in chosen])
    return {k: round(v, 4) for k, v in scores["accuracy"].items()}
