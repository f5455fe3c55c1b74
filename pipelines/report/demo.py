"""The last step of ``clipcap demo``: evaluate the held-out captions and write the report.

    out = evaluate_and_report(root, captions_uri, archive_uri, seed=0, start=256, n=32, run_dir=...)

The references are the true captions of the held-out synthetic samples (regenerated from ``seed``/``start``:
the generator is deterministic per index), written as ``<root>/references/heldout.jsonl``. Without Java the
evaluation uses the simple tokenizer and leaves METEOR out, and says so.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

from pipelines.io import storage


def write_references(uri: str, samples: list[Any]) -> None:
    fs, path = storage.filesystem(uri)
    storage.ensure_dir(fs, path.rsplit("/", 1)[0])
    with fs.open(path, "w") as f:
        f.writelines(json.dumps({"key": s.key, "caption": s.caption}) + "\n" for s in samples)


def evaluate_and_report(root: str, captions: str, images: str, *, seed: int, start: int, n: int,
                        run_dir: str | None = None) -> dict[str, Any]:
    from clipcap_core import synthetic
    from pipelines.evaluate import EvaluateConfig, format_table, run_evaluate
    from pipelines.report import ReportConfig, build_report

    refs = storage.join(root, "references", "heldout.jsonl")
    write_references(refs, list(synthetic.generate(n, seed=seed, size=64, start=start)))
    lines = []
    java = shutil.which("java") is not None
    if not java:
        lines.append("no Java: evaluating with the simple tokenizer, without METEOR (install a JRE for COCO's)")
    evaluation = storage.join(root, "evaluation", "heldout")
    summary = run_evaluate(EvaluateConfig(
        predictions=captions, references=refs, images=images, output=evaluation,
        tokenize="ptb" if java else "simple",
        metrics=("bleu", "meteor", "rouge", "cider") if java else ("bleu", "rouge", "cider")))
    lines.append(f"evaluate: {captions} against the true captions -> {evaluation}")
    lines.extend(format_table(summary).splitlines())
    report = storage.join(root, "report.html")
    build_report(ReportConfig(captions=captions, evaluation=evaluation, run=run_dir, out=report))
    lines.append(f"report: {report}  (open it in a browser: gallery, metrics, training curves, model card)")
    return {"evaluation": evaluation, "report": report, "summary": summary, "lines": lines}
