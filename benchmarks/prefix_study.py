"""The prefix-length study (``clipcap study prefix``) on the ``scenes`` world, start to end in one command: render
and embed ``--rows`` training scenes with the shipped ``tiny-scenes`` CLIP (``write_scenes_tables``), then the
study grid on Ray Tune over those tables with the tiny presets (``tiny``: MLP; ``tiny-transformer``: transformer;
2-layer 64-wide GPT-2 from a seeded random init, so "frozen" here is a frozen *random* LM, unlike the paper's
pretrained GPT-2) and the scenes vocabulary.

    python benchmarks/prefix_study.py --root /tmp/study     # 1 10 20 x mlp transformer x frozen tuned x 2 seeds
    python benchmarks/prefix_study.py --root /tmp/study --seeds 0 1 2 --epochs 10 --rows 3000   # a longer one

Prints the table (also in ``<root>/studies/prefix-study/table.md`` with ``table.parquet``, ``trials.parquet``,
``prefix.png``).
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
    ap.add_argument("--root", required=True, help="folder for the tables and the study output")
    ap.add_argument("--rows", type=int, default=1900, help="scenes rows (10%% of keys held out)")
    ap.add_argument("--prefix-lengths", type=int, nargs="+", default=[1, 10, 20])
    ap.add_argument("--mappings", nargs="+", default=["mlp", "transformer"])
    ap.add_argument("--lms", nargs="+", default=["frozen", "tuned"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--trial-cpus", type=float, default=1.0)
    return ap


def main(argv: list[str] | None = None) -> int:
    import ray

    from clipcap_core.training import TrainConfig
    from pipelines.demo.synthetic_tables import write_scenes_tables
    from pipelines.train.study import StudyConfig, format_table, run_prefix_study

    args = parser().parse_args(argv)
    t0 = time.perf_counter()
    files = write_scenes_tables(str(Path(args.root) / "data"), args.rows)
    print(f"{args.rows} scenes rows embedded in {time.perf_counter() - t0:.0f} s", flush=True)
    cfg = StudyConfig(tables=tuple(files), output=str(Path(args.root) / "studies"),
                      prefix_lengths=tuple(args.prefix_lengths), mappings=tuple(args.mappings), lms=tuple(args.lms),
                      seeds=tuple(args.seeds), model_overrides={"tokenizer": "word-scenes"},
                      train=TrainConfig(epochs=args.epochs, batch_size=32, lr=3e-3, warmup_steps=20),
                      trial_cpus=args.trial_cpus)
    ray.init(log_to_driver=False)
    _, table = run_prefix_study(cfg)
    print(format_table(table))
    print(f"\n{time.perf_counter() - t0:.0f} s in all; saved under {cfg.output}/{cfg.name}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
