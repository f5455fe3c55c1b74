"""The last step of ``clipcap demo``: evaluate the held-out captions and write the report."""

from __future__ import annotations

import json
import shutil
from typing import Any

from clipcap_core import uris
from pipelines.evaluate.run import EvaluateConfig, format_table, run_evaluate
from pipelines.io import storage


def write_references(uri: str, references: dict[str, list[str]]) -> None:
    fs, path = uris.filesystem(uri)
    storage.ensure_dir(fs, path.rsplit("/", 1)[0])
    with fs.open(path, "w") as f:
        f.writelines(json.dumps({"key": key, "caption": c}) + "\n" for key, caps in references.items() for c in caps)


def evaluate_and_report(root: str, captions: str, images: str, *, references: dict[str, list[str]],
                        run_dir: str | None = None) -> dict[str, Any]:
    # lazy: torch ~6.7 s, transformers ~1.4 s to import (python -X importtime)
    from pipelines.report.build import ReportConfig, build_report

    refs = storage.join(root, "references", "heldout.jsonl")
    write_references(refs, references)
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
