"""``clipcap report``: one self-contained, escaped HTML page from a bounded sample; and the page as headless
Chromium renders it (images loaded, captions, metric table, charts), with a screenshot kept as an artifact."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.evaluate import EvaluateConfig, run_evaluate
from pipelines.report.sample import sample_captions
from tests.pipelines.report_helpers import HOSTILE, captioned_run

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    run = captioned_run(root)
    summary = run_evaluate(EvaluateConfig(predictions=run["captions"], references=run["refs"], images=run["input"],
                                          output=str(root / "eval"), tokenize="simple", metrics=("bleu", "cider")))
    out = root / "site" / "report.html"
    assert main(["report", "--captions", run["captions"], "--evaluation", str(root / "eval"), "--run", run["run"],
                 "--out", str(out)]) == 0
    return {**run, "html": out.read_text(), "path": out, "summary": summary}


def test_page_is_self_contained_escaped_and_complete(report):
    html = report["html"]
    assert "<script" not in html and "&lt;script&gt;document.title=" in html  # the hostile caption is text
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", html)  # nothing fetched from elsewhere
    assert len(re.findall(r'<img class="thumb" alt="[^"]*" src="data:image/jpeg;base64,', html)) == 8
    for s in report["samples"][1:]:
        assert s.caption in html
    cider = f"{report['summary']['metrics']['cider'] * 100:.2f}"
    assert re.search(rf"<td>CIDEr</td><td class=\"num\">{re.escape(cider)}</td>", html)
    assert html.count('id="chart-training" alt="training curves" src="data:image/png;base64,') == 1
    assert len(re.findall(r'<tr><td class="key">shard\d\.tar/syn\d+\.png</td>', html)) == 4  # interpretation rows
    assert "- cider: 1.23" in html  # the model card of the artifact recorded in the caption table


def test_sample_reads_only_a_few_parts(report):
    s = sample_captions(report["captions"], 3, max_parts=1, seed=1)
    assert s.parts_total == 2 and s.parts_read == 1 and len(s.items) == 3
    assert len({it.part_id for it in s.items}) == 1 and s.rows_read == 8  # one part: 4 images x 2 ranks
    assert all([c["rank"] for c in it.captions] == [0, 1] for it in s.items)


def test_bad_report_options_fail_clearly(report, tmp_path, capsys):
    assert main(["report", "--captions", str(tmp_path / "nothing"), "--out", str(tmp_path / "r.html")]) == 2
    assert "no caption table parts" in capsys.readouterr().err
    assert main(["report", "--captions", report["captions"], "--out", str(tmp_path / "r.pdf")]) == 2
    assert "must be an .html file" in capsys.readouterr().err


def test_report_renders_in_headless_chromium(report):
    chromium = shutil.which("chromium") or shutil.which("chromium-headless-shell")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make setup installs it)")
    playwright = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.goto(report["path"].as_uri(), wait_until="load")
            state = page.evaluate("""() => ({
                thumbs: [...document.querySelectorAll('#gallery img.thumb')].map(i => [i.complete, i.naturalWidth,
                        i.getBoundingClientRect().width]),
                charts: [...document.querySelectorAll('img[id^=chart-]')].map(i => [i.id, i.naturalWidth]),
                metrics: [...document.querySelectorAll('#metrics tr')].map(r => r.innerText),
                captions: [...document.querySelectorAll('#gallery .cap')].map(c => c.innerText),
                title: document.title, scripts: document.scripts.length })""")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    print(f"report screenshot: {shot}")
    assert len(state["thumbs"]) == 8 and all(ok and w > 0 and shown > 0 for ok, w, shown in state["thumbs"])
    assert ("chart-training", 1000) in [tuple(c) for c in state["charts"]] and all(w > 0 for _, w in state["charts"])
    assert any(row.startswith("CIDEr") for row in state["metrics"]) and len(state["metrics"]) >= 4
    assert HOSTILE in state["captions"] and state["title"].startswith("clipcap report")  # rendered as text
    assert state["scripts"] == 0 and shot.stat().st_size > 10_000
    assert json.loads((Path(report["captions"]) / "_meta" / "run.json").read_text())["input"] == report["input"]


def test_demo_report_step_evaluates_the_heldout_captions_and_prints_the_report_path(report, tmp_path, monkeypatch):
    """The demo's last step on a captioned held-out set (the helper's samples are what the demo would
    regenerate for seed 5, start 900): evaluation against the true captions, then the report. Run as on a
    machine without Java (the Java path is tests/core/test_metrics.py's; each JVM start costs seconds)."""
    from pipelines.demo.run import DemoConfig, DemoResult, step_report
    from pipelines.report import demo as report_demo

    monkeypatch.setattr(report_demo.shutil, "which", lambda name: None)

    result = DemoResult(root=str(tmp_path), paths={"captions": report["captions"]},
                        summaries={"caption": {"archive": report["input"]}, "train": {"run_dir": report["run"]}})
    step_report(DemoConfig(root=str(tmp_path), samples=900, seed=5), result, n=8)
    assert result.paths["report"] == str(tmp_path / "report.html") and (tmp_path / "report.html").exists()
    assert result.lines[-1].startswith(f"report: {tmp_path / 'report.html'}")
    summary = result.summaries["evaluate"]
    assert summary["evaluated"] == 8 and summary["missing_references"]["count"] == 0
    assert summary["metrics"]["exact_match"] == pytest.approx(7 / 8)  # the hostile caption is the one miss
    assert "CIDEr" in "\n".join(result.lines) and 'id="chart-training"' in (tmp_path / "report.html").read_text()
    assert result.lines[0].startswith("no Java: evaluating with the simple tokenizer")


def test_a_plain_caption_table_without_ranks_scores_or_images_still_reports(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.io import schemas
    from pipelines.report import ReportConfig, build_report

    (tmp_path / "caps").mkdir()
    rows = {"key": ["a.jpg", "b.jpg"], "caption": ["a dog", "a <b>bold</b> cat"], "score": [None, -1.0],
            "model": ["m", "m"], "created_at": [None, None]}
    pq.write_table(pa.table(rows, schema=schemas.CAPTIONS_SCHEMA), tmp_path / "caps" / "part-x.parquet")
    out = build_report(ReportConfig(captions=str(tmp_path / "caps"), out=str(tmp_path / "r.html"), sample=5))
    html = Path(out).read_text()
    assert "a dog" in html and "a &lt;b&gt;bold&lt;/b&gt; cat" in html and "No evaluation given" in html
    assert html.count('<figure class="card">') == 2 and "no image" in html
