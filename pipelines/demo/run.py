"""``clipcap demo`` / ``make demo``: the embedded default end to end on one machine: embed a synthetic world,
train the ``tiny`` preset, caption held-out images through the bulk pipeline, evaluate and report. ``--decap``
adds a captioner trained on a text-only caption corpus (its memory must cover the captions the images need).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipcap_core import uris
from clipcap_core.artifacts import load_model
from clipcap_core.clip_eval import l2n
from clipcap_core.decap import ProjectionConfig
from clipcap_core.decoding import generate
from clipcap_core.encoders import EncoderConfig, load_encoder
from clipcap_core.synthetic import all_captions
from clipcap_core.synthetic import parse_caption as synthetic_caption
from clipcap_core.training import TrainConfig
from pipelines import runtime
from pipelines.caption.job import CaptionConfig, ResourceOptions, caption_archive
from pipelines.caption.output import table_uri
from pipelines.clip.evaluate import encode_texts
from pipelines.clip.tiny import zero_shot_captions
from pipelines.demo.worlds import world as get_world
from pipelines.embed.download_embed import default_job_config, result_dict, run_embed_job
from pipelines.embed.job import EmbedResources
from pipelines.embed.text import EmbedTextConfig, run_embed_text
from pipelines.evaluate.run import EvaluateConfig, format_table, run_evaluate
from pipelines.io import schemas, storage, tables
from pipelines.report.build import ReportConfig, build_report
from pipelines.train.job import TrainJobConfig, run_training
from pipelines.train.setup import DecapOptions
from pipelines.train.state import RunOptions

log = logging.getLogger(__name__)
ARCHIVE = "heldout.tar"
Accuracy = Callable[[list[str], list[str]], dict[str, dict[str, float]]]


def write_archive(uri: str, samples: Sequence[Any]) -> None:
    """A tar of ``<key>.png`` members at ``uri`` (any fsspec URI)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for s in samples:
            png = io.BytesIO()
            s.image.save(png, format="PNG")
            info = tarfile.TarInfo(f"{s.key}.png")
            info.size = png.tell()
            png.seek(0)
            tf.addfile(info, png)
    storage.write_file(uri, buf.getvalue())


def read_captions(output: str) -> pa.Table:
    """All committed caption parts of an output, concatenated (metadata dropped)."""
    tables = []
    for uri in storage.list_files(table_uri(output), ".parquet"):
        fs, path = uris.filesystem(uri)
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f).replace_schema_metadata(None))
    return pa.concat_tables(tables) if tables else schemas.CAPTIONS_SCORED_SCHEMA.empty_table()


def _norm(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


def caption_heldout(root: str, model_uri: str, samples: Sequence[Any], *, show: int = 5,
                    resources: ResourceOptions | None = None, echo: Callable[[str], None] = print,
                    name: str = "heldout", projection: Any = None, accuracy: Accuracy | None = None
                    ) -> dict[str, Any]:
    """Caption held-out samples through the bulk pipeline into ``<root>/captions/<name>``; print a few next to
    the truth. With ``accuracy`` (``World.accuracy``) exact match is any wording of the same scene."""
    archive = storage.join(root, "archives", ARCHIVE)
    output = storage.join(root, "captions", name)
    write_archive(archive, samples)
    extra = {"projection": projection} if projection is not None else {}
    summary = caption_archive(CaptionConfig(input=archive, output=output, model=model_uri, overwrite=True,
                                            resources=resources or ResourceOptions(), **extra))
    table = read_captions(output).to_pylist()
    predicted = {r[schemas.KEY]: r[schemas.CAPTION] for r in table if r[schemas.RANK] == 0}
    truth = {f"{ARCHIVE}/{s.key}.png": s.caption for s in samples}
    hits = sum(_norm(predicted.get(k, "")) == _norm(v) for k, v in truth.items())
    echo(f"captioned {summary.images} held-out images from {archive} into {output} "
         f"({summary.errors} errors, {summary.images_per_s:.1f} images/s incl. start-up)")
    for key in sorted(truth)[:show]:
        mark = "ok " if _norm(predicted.get(key, "")) == _norm(truth[key]) else "   "
        echo(f"  {mark} true: {truth[key]:<40s} model: {predicted.get(key, '<no caption>')}")
    echo(f"exact match on held-out images: {hits}/{len(truth)}")
    out = {"archive": archive, "output": output, "images": summary.images, "errors": summary.errors,
           "exact_match": hits / max(1, len(truth)), "summary": summary.as_dict()}
    if accuracy is not None:
        keys = sorted(truth)
        scores = accuracy([predicted.get(k, "") for k in keys], [truth[k] for k in keys])
        out.update(exact_match=scores["accuracy"]["exact"], accuracy=scores)
        echo("held-out accuracy, any wording (chance in brackets): " + ", ".join(
            f"{k} {100 * v:.0f}% ({100 * scores['chance'][k]:.2g}%)" for k, v in scores["accuracy"].items()))
    return out


def clip_zero_shot(info: tables.TableInfo, held: pa.Table) -> dict[str, float]:
    """Zero-shot figures of the CLIP that made ``held``'s embeddings on those rows (synthetic captions only)."""
    caps = held.column("caption").to_pylist()
    if not info.clip_model or not caps:
        return {}
    try:
        enc = load_encoder(EncoderConfig(model_name=info.clip_model, pretrained=info.clip_pretrained or None))
    except ValueError:  # tables made by a CLIP this process cannot load: no zero-shot line
        return {}
    if enc.dim != info.dim or any(synthetic_caption(c) is None for c in caps):
        return {}
    return zero_shot_captions(enc, tables.embeddings_numpy(held), caps)


def _tiny_job(table: str, root: str, name: str, *, seed: int, epochs: int, max_caption_tokens: int,
              **options: Any) -> TrainJobConfig:
    """The demo's training job: the ``tiny`` preset on one Ray Train worker."""
    return TrainJobConfig(
        tables=(table,), output=storage.join(root, "runs"), name=name, model="tiny", **options,
        train=TrainConfig(epochs=epochs, batch_size=16, lr=3e-3, warmup_steps=20,
                          max_caption_tokens=max_caption_tokens, seed=seed),
        run=RunOptions(checkpoint_every=10**6, log_every=100, eval_max_samples=256, eval_every=10))


def demo_train(embeddings_uri: str, root: str, *, seed: int = 0, epochs: int = 30,
               world: str = "synthetic") -> dict[str, Any]:
    """Train on the demo's embedding table, then caption its key-hash held-out rows with the saved artifact and
    report exact-match and per-attribute accuracy."""
    w = get_world(world)
    files = tables.list_table_files(embeddings_uri)
    info = tables.inspect_tables(files)
    job = _tiny_job(embeddings_uri, root, f"demo-{info.clip_model}-{info.num_rows}-s{seed}", seed=seed,
                    epochs=epochs, max_caption_tokens=w.max_caption_tokens, heldout_fraction=0.2,
                    model_overrides={"mapping.normalize_prefix": True, "tokenizer": w.tokenizer})
    t0 = time.perf_counter()
    result = run_training(job)
    seconds = time.perf_counter() - t0
    held = tables.read_split(files, job.split("heldout"))
    loaded = load_model(result.artifact)
    texts = generate(loaded.model, tables.embeddings_numpy(held), loaded.tokenizer, "greedy",
                     max_length=w.max_caption_tokens).texts
    scores = w.accuracy(texts, held.column("caption").to_pylist())
    acc, chance = scores["accuracy"], scores["chance"]
    per_attr = ", ".join(f"{k} {100 * acc[k]:.0f}% ({100 * chance[k]:.2g}%)" for k in acc if k != "exact")
    n_train = info.num_rows - held.num_rows
    zs = clip_zero_shot(info, held)
    lines = [
        f"train: tiny preset (MLP mapping, k=4), 1 Ray Train worker, {epochs} epochs on {n_train} rows in "
        f"{seconds:.0f} s -> {result.artifact}",
        f"held-out accuracy ({held.num_rows} rows held out by key hash; chance in brackets): exact caption "
        f"{100 * acc['exact']:.1f}% ({100 * chance['exact']:.2f}%); {per_attr}",
    ]
    if zs:
        scores["clip_zero_shot"] = zs
        lines.append(
            f"  the CLIP itself ({info.clip_model}), zero-shot on the same held-out images (most similar of all 432 "
            f"synthetic captions): exact {100 * zs['top1_exact']:.1f}%; " + ", ".join(
                f"{k[5:]} {100 * v:.0f}%" for k, v in zs.items() if k.startswith("attr_")))
    return {"artifact": result.artifact, "run_dir": result.run_dir, "heldout_rows": held.num_rows,
            "train_rows": n_train, "seconds": seconds, **scores, "examples": list(zip(texts[:3],
            held.column("caption").to_pylist()[:3], strict=True)), "lines": lines}


def write_corpus(root: str, n: int, seed: int, world: str = "synthetic") -> str:
    """``n`` generator captions, one per line (no image is rendered), at ``<root>/decap-corpus/captions.txt``."""
    uri = storage.join(root, "decap-corpus", "captions.txt")
    storage.write_file(uri, "\n".join(get_world(world).corpus(n, seed)) + "\n")
    return uri


def embed_captions(corpus_uri: str, root: str, encoder: Any, dataset: str = "synthetic-captions",
                   input_format: str = "auto") -> str:
    """Text-embedding table of the captions in ``corpus_uri`` (resumable); returns its URI."""
    cfg = EmbedTextConfig(input=corpus_uri, output_root=root, dataset=dataset, input_format=input_format,
                          encoder=encoder, resources=EmbedResources(batch_size=256))
    return run_embed_text(cfg).table_uri


def train_decap(table_uri: str, root: str, *, seed: int = 0, epochs: int = 30, noise_std: float = 0.0,
                memory_size: int = 0, name: str | None = None, max_caption_tokens: int = 16) -> Any:
    """``train --decoder decap`` on a text table; returns the TrainJobResult."""
    return run_training(_tiny_job(table_uri, root, name or f"decap-s{seed}", seed=seed, epochs=epochs,
                                  max_caption_tokens=max_caption_tokens, decoder="decap", heldout_fraction=0.1,
                                  decap=DecapOptions(noise_std=noise_std, memory_size=memory_size)))


def zero_shot_top1(clip: Any, image_emb: np.ndarray, samples: Sequence[Any], world: str) -> float:
    """The CLIP's image -> caption retrieval top-1 (exact caption): synthetic over all 432 captions, scenes over
    the canonical captions of ``samples`` (the caption space is too large to rank)."""
    truth = [s.caption for s in samples]
    if world == "synthetic":
        return zero_shot_captions(clip, image_emb, truth)["top1_exact"]
    classes = sorted(set(truth))
    best = (l2n(image_emb) @ l2n(encode_texts(clip, classes)).T).argmax(1)
    return float(np.mean([classes[i] == t for i, t in zip(best, truth, strict=True)]))


def demo_decap(root: str, samples: Sequence[Any], *, encoder: Any, seed: int = 0, corpus_size: int = 3000,
               epochs: int = 15, image_model_exact: float | None = None, world: str = "synthetic",
               echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train a text-only model on a caption corpus, caption ``samples`` with its memory projection and without,
    and print their exact match beside the CLIP's zero-shot top-1 and the image-trained model's."""
    w = get_world(world)
    accuracy = w.accuracy if world != "synthetic" else None  # synthetic: one wording, exact string match
    t0 = time.perf_counter()
    table = embed_captions(write_corpus(root, corpus_size, seed, world), root, encoder, dataset=f"{world}-captions")
    trained = train_decap(table, root, seed=seed, epochs=epochs, max_caption_tokens=w.max_caption_tokens)
    echo(f"decap: text-only model (tiny preset) trained on {corpus_size} {world} captions, no image, in "
         f"{time.perf_counter() - t0:.0f} s -> {trained.artifact}; held-out caption texts reconstructed: "
         f"{100 * trained.metrics.get('exact_match', 0.0):.0f}%")
    projected = caption_heldout(root, trained.artifact, samples, name="heldout-decap", echo=echo, accuracy=accuracy)
    raw = caption_heldout(root, trained.artifact, samples, name="heldout-decap-raw", show=0, echo=lambda _: None,
                          projection=ProjectionConfig(mode="none"), accuracy=accuracy)
    clip = load_encoder(encoder)
    pixels = np.stack([clip.resize(s.image) for s in samples])
    zero = zero_shot_top1(clip, clip.encode_pixels(pixels), samples, world)
    candidates = len(all_captions()) if world == "synthetic" else len({s.caption for s in samples})  # what it ranks
    side = f"; image-trained model: {100 * image_model_exact:.0f}%" if image_model_exact is not None else ""
    echo(f"decap on {len(samples)} held-out images: {100 * projected['exact_match']:.0f}% exact with the memory "
         f"projection, {100 * raw['exact_match']:.0f}% decoding the raw image embedding; CLIP {encoder.model_name} "
         f"zero-shot top-1 {100 * zero:.0f}% among {candidates} captions{side} (meaningful only with aligned image "
         "and text towers)")
    return {"artifact": trained.artifact, "text_table": table, "train_metrics": trained.metrics,
            "exact_match": projected["exact_match"], "exact_match_raw": raw["exact_match"],
            "zero_shot_top1": zero, "captions": projected["output"],
            "accuracy": projected.get("accuracy"), "accuracy_raw": raw.get("accuracy")}


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
    job = default_job_config(result.root, samples=cfg.samples, seed=cfg.seed, world=cfg.world)
    out = run_embed_job(job, ray_address=ray_address(cfg))
    assert job.synthetic is not None and job.download is not None
    result.url_list = str(Path(job.synthetic.folder) / "captions.tsv")
    result.raw_uri = job.download.output
    result.embeddings_uri = out.embed.table_uri
    result.summaries["embed"] = result_dict(out)
    result.lines.append(out.describe())


def step_train(cfg: DemoConfig, result: DemoResult) -> None:
    """The tiny preset trained on the embedded set; hands the model artifact to the captioning step."""
    runtime.ensure_ray(ray_address(cfg))
    assert result.embeddings_uri is not None
    report = demo_train(result.embeddings_uri, result.root, seed=cfg.seed, world=cfg.world)
    result.paths["model"] = report.pop("artifact")
    result.summaries["train"] = {k: v for k, v in report.items() if k != "lines"}
    result.lines.extend(report["lines"])


def step_caption(cfg: DemoConfig, result: DemoResult, n: int = 32) -> None:
    """Held-out images (never embedded nor trained on) -> a tar archive -> bulk captioning with the demo's model."""
    runtime.ensure_ray(ray_address(cfg))
    model = result.paths.get("model", "tiny")
    if model == "tiny":
        result.lines.append("no trained model in this demo run: captioning with the untrained `tiny` preset")
    samples = get_world(cfg.world).heldout(n, cfg.seed, cfg.samples)
    report = caption_heldout(result.root, model, samples, echo=result.lines.append,
                             accuracy=get_world(cfg.world).accuracy)
    result.paths["captions"] = report["output"]
    result.summaries["caption"] = report


def step_report(cfg: DemoConfig, result: DemoResult, n: int = 32) -> None:
    """``step_caption``'s captions (same ``n`` samples) -> ``clipcap evaluate`` against every true caption, with
    CLIPScore on the archive's images -> ``clipcap report``."""
    if "captions" not in result.paths:
        result.lines.append("no caption table in this demo run: evaluation and report skipped")
        return
    w, captions = get_world(cfg.world), result.paths["captions"]
    refs = storage.join(result.root, "references", "heldout.jsonl")
    storage.write_file(refs, "".join(json.dumps({"key": s.key, "caption": c}) + "\n"
                                     for s in w.heldout(n, cfg.seed, cfg.samples) for c in w.references(s)))
    java = shutil.which("java") is not None
    if not java:
        result.lines.append("no Java: evaluating with the simple tokenizer, without METEOR (install a JRE for COCO's)")
    evaluation = storage.join(result.root, "evaluation", "heldout")
    summary = run_evaluate(EvaluateConfig(
        predictions=captions, references=refs, images=result.summaries["caption"]["archive"], output=evaluation,
        tokenize="ptb" if java else "simple",
        metrics=("bleu", "meteor", "rouge", "cider") if java else ("bleu", "rouge", "cider")))
    result.lines.append(f"evaluate: {captions} against the true captions -> {evaluation}")
    result.lines.extend(format_table(summary).splitlines())
    report = storage.join(result.root, "report.html")
    build_report(ReportConfig(captions=captions, evaluation=evaluation, out=report,
                              run=result.summaries.get("train", {}).get("run_dir")))
    result.lines.append(f"report: {report}  (open it in a browser: gallery, metrics, training curves, model card)")
    result.paths.update(evaluation=evaluation, report=report)
    result.summaries["evaluate"] = summary


STEPS: list[Step] = [step_embed, step_train, step_caption, step_report]  # step_decap is added by --decap


# (captions, epochs) of the DeCap step per world: ~2,800 steps each; 3,000 synthetic captions miss ~0.2% of the
# 432, while scenes (230,400 canonical captions) are never covered: its memory is a sample of the domain's text.
DECAP_CORPUS = {"synthetic": (3000, 15), "scenes": (10000, 5)}


def step_decap(cfg: DemoConfig, result: DemoResult, n: int = 32) -> None:
    """``clipcap demo --decap``: a text-only (DeCap) model captioning the same held-out images as
    ``step_caption``, next to the image-trained model."""
    runtime.ensure_ray(ray_address(cfg))
    assert result.raw_uri is not None and result.embeddings_uri is not None
    info = tables.inspect_tables(tables.list_table_files(result.embeddings_uri))  # the CLIP of the image step
    encoder = EncoderConfig(model_name=info.clip_model, pretrained=info.clip_pretrained or None)
    samples = get_world(cfg.world).heldout(n, cfg.seed, cfg.samples)  # the images step_caption captions
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
    clip = get_world(cfg.world).clip_model
    result.lines.append(f"clipcap demo: the EMBEDDED DEFAULT on the `tiny` preset (the shipped aligned `{clip}` CLIP, "
                        f"{cfg.samples} images of the `{cfg.world}` world), output under {root}")
    for step in STEPS if steps is None else steps:
        log.info("demo step %s", step.__name__)
        step(cfg, result)
    return result
