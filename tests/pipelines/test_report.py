"""``clipcap report``: one self-contained, escaped HTML page from a bounded sample; and the page as headless
Chromium renders it (images loaded, captions, metric table, charts), with a screenshot kept as an artifact."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.evaluate.run import EvaluateConfig, run_evaluate
from pipelines.report.build import sample_captions
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
    assert main(["report", "--input", run["captions"], "--evaluation", str(root / "eval"), "--run", run["run"],
                 "--output", str(out)]) == 0
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
    assert main(["report", "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "r.html")]) == 2
    assert "no caption table parts" in capsys.readouterr().err
    assert main(["report", "--input", report["captions"], "--output", str(tmp_path / "r.pdf")]) == 2
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
    from pipelines.demo import run as report_demo
    from pipelines.demo.run import DemoConfig, DemoResult, step_report

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
    from pipelines.report.build import ReportConfig, build_report

    (tmp_path / "caps").mkdir()
    rows = {"key": ["a.jpg", "b.jpg"], "caption": ["a dog", "a <b>bold</b> cat"], "score": [None, -1.0],
            "model": ["m", "m"], "created_at": [None, None]}
    pq.write_table(pa.table(rows, schema=schemas.CAPTIONS_SCHEMA), tmp_path / "caps" / "part-x.parquet")
    out = build_report(ReportConfig(captions=str(tmp_path / "caps"), out=str(tmp_path / "r.html"), sample=5))
    html = Path(out).read_text()
    assert "a dog" in html and "a &lt;b&gt;bold&lt;/b&gt; cat" in html and "No evaluation given" in html
    assert html.count('<figure class="card') == 2 and "no image" in html


# Planted failures: a swapped caption, an empty one and a looping one, beside the hostile first caption.
PLANTED = {2: "two large red circles at the bottom", 4: "", 6: "three three three large yellow circles"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    run = captioned_run(root, wrong=PLANTED)
    run_evaluate(EvaluateConfig(predictions=run["captions"], references=run["refs"], images=run["input"],
                                output=str(root / "eval"), tokenize="simple", metrics=("bleu", "cider")))
    paths = {}
    for order in ("worst", "key"):
        paths[order] = root / f"report-{order}.html"
        assert main(["report", "--input", run["captions"], "--evaluation", str(root / "eval"), "--run", run["run"],
                     "--order", order, "--output", str(paths[order])]) == 0
    wrong = [run["keys"][i] for i in (0, *PLANTED)]
    return {**run, "paths": paths, "html": paths["worst"].read_text(), "wrong": wrong}


def _stem(key: str) -> str:
    return key.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def test_report_leads_with_failures_then_scaled_metrics_and_a_filled_model_card(planted):
    html = planted["html"]
    assert html.index('id="failures"') < html.index('id="metrics"') < html.index('id="gallery"')
    assert 'class="bad"' in html and "4 of 8</strong> captions match none of their references" in html
    assert "<strong>2</strong> empty or looping" in html and "loops on &#39;three&#39;" in html
    assert re.search(r"<td>CIDEr</td><td class=\"num\">[\d.]+</td><td class=\"num\">0-1000</td>", html)
    assert re.search(r"<td>CLIPScore</td><td class=\"num\">[\d.]+</td><td class=\"num\">0-250</td>", html)
    card = html[html.index('id="model-card"'):]
    assert "tiny, trained weights shipped with clipcap_core" in card and "<td>lr</td><td>0.003</td>" in card
    assert "<td>cider</td><td>1.23</td>" in card and "<td>training tables</td><td>1: embeddings/part-0.parquet" in card
    cards = re.findall(r'<figure class="(card(?: bad)?)" data-key="([^"]+)"', html)
    assert {k for _, k in cards[:4]} == set(planted["wrong"])  # worst first: the flagged cards lead
    assert [cls for cls, _ in cards] == ["card bad"] * 4 + ["card"] * 4
    by_key = re.findall(r'<figure class="card(?: bad)?" data-key="([^"]+)"', planted["paths"]["key"].read_text())
    assert by_key == sorted(planted["keys"])


def test_train_loss_comes_from_the_epoch_rows_when_a_short_run_logged_too_few_steps(monkeypatch):
    """A 64-sample run logs no step row between its epochs: the chart still draws train loss (epoch means)."""
    from matplotlib.axes import Axes

    from pipelines.report.build import training_chart

    lines: list[tuple[str, list]] = []
    plot = Axes.plot

    def recording(ax, *args, **kwargs):
        lines.append((kwargs.get("label", ""), list(args[0]) if args else []))
        return plot(ax, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", recording)
    epochs = [{"kind": "epoch", "step": s, "epoch": s // 4, "train_loss": 3.0 / s, "val_loss": 2.0 / s}
              for s in (4, 8, 12)]
    for steps in ([], [{"kind": "step", "step": 4, "train_loss": 2.0}]):
        lines.clear()
        assert training_chart(steps + epochs) is not None
        assert [xs for label, xs in lines if label.startswith("train loss")] == [[4, 8, 12]], lines
    lines.clear()
    many = [{"kind": "step", "step": s, "train_loss": 1.0} for s in range(1, 6)]
    training_chart(many + epochs)
    assert [(label, xs) for label, xs in lines if label.startswith("train")] == [("train loss", [1, 2, 3, 4, 5])]


def test_failures_section_in_headless_chromium_lists_exactly_the_wrong_rows(planted):
    chromium = shutil.which("chromium") or shutil.which("chromium-headless-shell")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make setup installs it)")
    playwright = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report-failures.png"
    cards_js = """() => [...document.querySelectorAll('#gallery figure.card')]
        .map(c => [c.dataset.key, c.classList.contains('bad'), c.getBoundingClientRect().top,
                   c.getBoundingClientRect().left, c.querySelectorAll('.ref-match').length])
        .sort((a, b) => a[2] - b[2] || a[3] - b[3])"""
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.goto(planted["paths"]["worst"].as_uri(), wait_until="load")
            state = page.evaluate("""() => ({
                first: document.body.querySelector('section, table').id,
                mismatch: [...document.querySelectorAll('#failures-mismatch tr.failure')].map(r => r.dataset.key),
                degenerate: [...document.querySelectorAll('#failures-degenerate tr.failure')].map(r => r.dataset.key),
                border: getComputedStyle(document.getElementById('failures')).borderTopColor,
                scripts: document.scripts.length })""")
            worst = page.evaluate(cards_js)
            page.screenshot(path=str(shot), full_page=True)
            page.click("label[for=order-key]")
            by_key = page.evaluate(cards_js)
        finally:
            browser.close()
    shutil.copy(shot, "/tmp/report-failures.png")
    print(f"report failures screenshot: {shot} (copied to /tmp/report-failures.png)")
    wrong = planted["wrong"]
    assert state["first"] == "failures" and state["scripts"] == 0 and state["border"] == "rgb(176, 0, 32)"
    assert sorted(map(_stem, state["mismatch"])) == sorted(map(_stem, wrong))
    assert sorted(map(_stem, state["degenerate"])) == sorted(_stem(planted["keys"][i]) for i in (4, 6))
    assert {k for k, *_ in worst[:4]} == set(wrong) and [bad for _, bad, *_ in worst] == [True] * 4 + [False] * 4
    assert [refs for *_, refs in worst] == [0] * 4 + [1] * 4  # a reference is green only where it matches
    assert [k for k, *_ in by_key] == sorted(planted["keys"])  # the page's own switch, no script
    assert shot.stat().st_size > 10_000


def test_study_folders_become_a_studies_section_with_their_table_and_plot(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.io import schemas
    from pipelines.report.build import ReportConfig, build_report
    from pipelines.train import study

    (tmp_path / "caps").mkdir()
    rows = {"key": ["a.jpg"], "caption": ["a dog"], "score": [-1.0], "model": ["m"], "created_at": [None]}
    pq.write_table(pa.table(rows, schema=schemas.CAPTIONS_SCHEMA), tmp_path / "caps" / "part-x.parquet")
    trials = [{"mapping": "mlp", "prefix_length": k, "lm": "tuned", "seed": s, "cider": 1.0 + k / 10 + s / 100,
               "bleu4": 0.3, "trainable_params": 100 * k, "train_rows": 9, "seconds": 1.0} for k in (1, 10) for s in (0, 1)]
    study.save(trials, study.summarize(trials), str(tmp_path / "studies" / "prefix-study"))
    out = build_report(ReportConfig(captions=str(tmp_path / "caps"), out=str(tmp_path / "r.html"), sample=1,
                                    studies=(str(tmp_path / "studies" / "prefix-study"),)))
    html = Path(out).read_text()
    assert '<section class="study" id="study-prefix-study">' in html and "data:image/png;base64," in html
    assert "| mlp | 10 | tuned | 2 |" in html and "200.50 ± 0.71" in html  # CIDEr x100 of k = 10 over 2 seeds
    with pytest.raises(ValueError, match="not a `clipcap study` output folder"):
        build_report(ReportConfig(captions=str(tmp_path / "caps"), out=str(tmp_path / "r2.html"),
                                  studies=(str(tmp_path / "caps"),)))
