"""``clipcap demo`` / ``make demo``: the embedded default, end to end, on one machine."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipcap_core.encoders import EncoderConfig
from pipelines import runtime
from pipelines.demo.decap import demo_decap
from pipelines.demo.worlds import world
from pipelines.io import tables
from pipelines.report.demo import evaluate_and_report

log = logging.getLogger(__name__)


SAMPLES = {"synthetic": 1024, "scenes": 2048}  # images embedded per world by default


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    root: str = "data"  # everything the demo writes goes under here
    samples: int = 1024  # synthetic images downloaded and embedded (80% train, 20% held out by key hash)
    seed: int = 0
    ray_address: str | None = None  # None: RAY_ADDRESS if set, else a private local Ray instance
    world: str = "synthetic"  # pipelines.demo.worlds.WORLDS


@dataclass
class DemoResult:
    """What the steps produced; later steps read the earlier ones' paths from here."""

    root: str
    raw_uri: str | None = None
    embeddings_uri: str | None = None
    url_list: str | None = None
    paths: dict[str, str] = field(default_factory=dict)  # more outputs by name (model, captions, ...)
    summaries: dict[str, Any] = field(default_factory=dict)  # per step: its summary (JSON-safe)
    lines: list[str] = field(default_factory=list)  # human-readable report, in step order

    def describe(self) -> str:
        return "\n".join(self.lines)


Step = Callable[[DemoConfig, DemoResult], None]


def ray_address(cfg: DemoConfig) -> str:
    return cfg.ray_address or os.environ.get("RAY_ADDRESS") or "local"


def step_embed(cfg: DemoConfig, result: DemoResult) -> None:
    """Synthetic set -> local HTTP -> img2dataset shards -> tiny CLIP embeddings (jobs/embed_cc3m.py default)."""
    # lazy: pandas ~0.55 s to import (python -X importtime)
    from pipelines.embed.download_embed import default_job_config, result_dict, run_embed_job

    job = default_job_config(result.root, samples=cfg.samples, seed=cfg.seed, world=cfg.world)
    out = run_embed_job(job, ray_address=ray_address(cfg))
    assert job.synthetic is not None and job.download is not None
    result.url_list = str(Path(job.synthetic.folder) / "captions.tsv")
    result.raw_uri = job.download.output
    result.embeddings_uri = out.embed.table_uri
    result.summaries["embed"] = result_dict(out)
    result.lines.append(out.describe())


STEPS: list[Step] = [step_embed]


def step_train(cfg: DemoConfig, result: DemoResult) -> None:
    """The tiny preset trained on the embedded synthetic set with Ray Train (pipelines.demo.train);
    reports held-out accuracy and hands the model artifact to the captioning step."""
    # lazy: torch ~6.7 s, transformers ~1.4 s to import (python -X importtime)
    from pipelines.demo.train import demo_train

    runtime.ensure_ray(ray_address(cfg))
    assert result.embeddings_uri is not None
    report = demo_train(result.embeddings_uri, result.root, seed=cfg.seed, world=cfg.world)
    result.paths["model"] = report.pop("artifact")
    result.summaries["train"] = {k: v for k, v in report.items() if k != "lines"}
    result.lines.extend(report["lines"])


STEPS.append(step_train)


def step_caption(cfg: DemoConfig, result: DemoResult, n: int = 32) -> None:
    """Held-out synthetic images (indices past the demo's set: never embedded nor trained on) -> a tar archive
    -> bulk captioning (pipelines.caption.job) with the demo's model -> caption table; prints a few captions."""
    # lazy: torch ~6.7 s, transformers ~1.4 s to import (python -X importtime)
    from pipelines.demo.caption import caption_heldout

    runtime.ensure_ray(ray_address(cfg))
    model = result.paths.get("model", "tiny")
    if model == "tiny":
        result.lines.append("no trained model in this demo run: captioning with the untrained `tiny` preset")
    samples = world(cfg.world).heldout(n, cfg.seed, cfg.samples)
    report = caption_heldout(result.root, model, samples, echo=result.lines.append, accuracy=world(cfg.world).accuracy)
    result.paths["captions"] = report["output"]
    result.summaries["caption"] = report


STEPS.append(step_caption)  # captions with the model the earlier steps produced


def step_report(cfg: DemoConfig, result: DemoResult, n: int = 32) -> None:
    """The held-out captions of ``step_caption`` (same ``n`` samples) -> ``clipcap evaluate`` against the true
    captions (all references of each image; CLIPScore on the archive's images) -> ``clipcap report``; prints the
    table and the report's path."""
    if "captions" not in result.paths:
        result.lines.append("no caption table in this demo run: evaluation and report skipped")
        return
    w = world(cfg.world)
    refs = {s.key: list(w.references(s)) for s in w.heldout(n, cfg.seed, cfg.samples)}
    report = evaluate_and_report(result.root, result.paths["captions"], result.summaries["caption"]["archive"],
                                 references=refs, run_dir=result.summaries.get("train", {}).get("run_dir"))
    result.paths.update(evaluation=report["evaluation"], report=report["report"])
    result.summaries["evaluate"] = report["summary"]
    result.lines.extend(report["lines"])


STEPS.append(step_report)  # the last step: it reports on what the earlier steps produced


# (captions, epochs) of the DeCap step per world: ~2,800 steps each; 3,000 synthetic captions miss ~0.2% of the
# 432, while scenes (230,400 canonical captions) are never covered: its memory is a sample of the domain's text.
DECAP_CORPUS = {"synthetic": (3000, 15), "scenes": (10000, 5)}


def step_decap(cfg: DemoConfig, result: DemoResult, n: int = 32) -> None:
    """``clipcap demo --decap``: a text-only (DeCap) model trained on a caption corpus of the world alone (no
    image), captioning the same held-out images as ``step_caption``, next to the image-trained model
    (pipelines.demo.decap)."""
    runtime.ensure_ray(ray_address(cfg))

    assert result.raw_uri is not None and result.embeddings_uri is not None
    info = tables.inspect_tables(tables.list_table_files(result.embeddings_uri))  # the CLIP of the image step
    encoder = EncoderConfig(model_name=info.clip_model, pretrained=info.clip_pretrained or None)
    samples = world(cfg.world).heldout(n, cfg.seed, cfg.samples)  # the images step_caption captions
    corpus_size, epochs = DECAP_CORPUS[cfg.world]
    report = demo_decap(result.root, samples, encoder=encoder, seed=cfg.seed, corpus_size=corpus_size,
                        epochs=epochs, world=cfg.world,
                        image_model_exact=result.summaries.get("caption", {}).get("exact_match"),
                        echo=result.lines.append)
    result.paths["decap_model"] = report["artifact"]
    result.summaries["decap"] = report


def run_demo(cfg: DemoConfig = DemoConfig(), steps: Sequence[Step] | None = None) -> DemoResult:
    """Run ``steps`` (default: ``STEPS``) in order; returns the paths and summaries they recorded."""
    root = str(Path(cfg.root).resolve()) if "://" not in cfg.root else cfg.root
    result = DemoResult(root=root)
    clip = world(cfg.world).clip_model
    result.lines.append(f"clipcap demo: the EMBEDDED DEFAULT on the `tiny` preset (the shipped aligned `{clip}` CLIP, "
                        f"{cfg.samples} images of the `{cfg.world}` world), output under {root}")
    for step in STEPS if steps is None else steps:
        log.info("demo step %s", step.__name__)
        step(cfg, result)
    return result
