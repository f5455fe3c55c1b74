"""``clipcap study decoding``: what each decoding strategy (greedy, beam, nucleus sampling, ``n`` samples reranked
by the model's own CLIP as ``clipcap caption --rerank clip`` does) costs in images/s, timed end to end, and buys in
held-out COCO metrics and CLIPScore, for one trained model on one set of embeddings.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from pipelines.io import storage, tables

METRICS = ("bleu1", "bleu4", "meteor", "rouge_l", "cider", "clip_score")


@dataclass(frozen=True, kw_only=True)
class DecodingOptions:
    beam_sizes: tuple[int, ...] = (3, 5)  # beam sizes
    top_p: float = 0.9  # nucleus mass of sampling
    temperature: float = 1.0  # sampling temperature
    rerank_n: tuple[int, ...] = (5,)  # samples per image that CLIP reranks
    max_length: int = 24  # caption tokens at most
    seed: int = 0
    tokenize: Literal["ptb", "simple"] = "ptb"  # ptb: the COCO tokenizer (Java); simple: none
    metrics: tuple[str, ...] = ("bleu", "meteor", "rouge", "cider")  # COCO metrics (METEOR and ptb need Java)
    repeats: int = 1  # runs per strategy, the fastest timed (same seed: same captions)

    def strategies(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(label, strategy, options) per row of the study, greedy first."""
        sample = {"top_p": self.top_p, "temperature": self.temperature, "seed": self.seed}
        rows = [("greedy", "greedy", {})]
        rows += [(f"beam {b}", "beam", {"beam_size": b}) for b in self.beam_sizes]
        rows.append((f"sample (top-p {self.top_p:g}, T {self.temperature:g})", "sample", sample))
        rows += [(f"{n} samples + CLIP rerank", "rerank", {**sample, "n": n}) for n in self.rerank_n]
        return rows


@dataclass(frozen=True, kw_only=True)
class DecodingStudyConfig:
    """The ``clipcap study decoding`` config; the flags it shares with ``StudyConfig`` are that config's."""

    CLI_FLAGS: ClassVar[dict[str, str | None]] = {
        "tables": "--input", "max_rows": "--eval-max-samples", "options.seed": None, "options.metrics": None}
    tables: tuple[str, ...]  # embedding tables of the model's CLIP
    model: str  # the trained model artifact (required)
    output: str
    name: str = "decoding-study"
    heldout_fraction: float = 0.1  # the key-hash held-out split of the training job (0: every row)
    max_rows: int = 500
    options: DecodingOptions = field(default_factory=DecodingOptions)


def _captions(model: Any, tok: Any, emb: np.ndarray, strategy: str, opts: dict[str, Any], max_length: int,
              scorer: Any) -> list[str]:
    from clipcap_core.decoding import generate
    from pipelines.caption.stages import score_and_rank

    if strategy != "rerank":
        return generate(model, emb, tok, strategy, max_length=max_length, **opts).texts
    gen = generate(model, emb, tok, "sample", max_length=max_length, **opts)
    texts = gen.grouped()
    scores = np.asarray(gen.scores, dtype=np.float32).reshape(len(texts), gen.n).tolist()
    ranked, _, _ = score_and_rank(emb, texts, scores, scorer, rerank=True)
    return [g[0] for g in ranked]


def decoding_study(model: Any, tok: Any, emb: np.ndarray, refs: list[list[str]], options: DecodingOptions,
                   scorer: Any) -> list[dict[str, Any]]:
    """One row per strategy: images/s of decoding (+ reranking) and the metrics of its captions vs ``refs``."""
    from clipcap_core.metrics import evaluate_predictions

    rows = []
    for label, strategy, opts in options.strategies():
        if strategy == "rerank" and scorer is None:
            continue  # no CLIP to rerank with (the table's CLIP cannot be loaded here)
        seconds = float("inf")
        for _ in range(max(1, options.repeats)):  # the fastest run: the least disturbed by other work
            t0 = time.perf_counter()
            texts = _captions(model, tok, emb, strategy, opts, options.max_length, scorer)
            seconds = min(seconds, time.perf_counter() - t0)
        ev = evaluate_predictions(texts, refs, metrics=options.metrics, tokenize=options.tokenize, spice="off",
                                  image_emb=emb, scorer=scorer)
        rows.append({"strategy": label, "images_per_s": len(texts) / seconds, "seconds": seconds,
                     **{m: ev.summary.get(m) for m in METRICS}, "images": len(texts), "example": texts[0]})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown, metrics x100 (CLIPScore as is), with each strategy's change over greedy in CIDEr / CLIPScore."""
    head = ["strategy", "images/s", "BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "CLIPScore",
            "CIDEr vs greedy", "CLIPScore vs greedy"]
    base = rows[0] if rows else {}

    def num(v: Any, scale: float = 100.0) -> str:
        return "-" if v is None else f"{scale * v:.2f}"

    def delta(r: dict[str, Any], m: str, scale: float) -> str:
        if r.get(m) is None or base.get(m) is None:
            return "-"
        return f"{scale * (r[m] - base[m]):+.2f}"

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["strategy"], f"{r['images_per_s']:.1f}", *(num(r.get(m)) for m in METRICS[:-1]),
                 num(r.get("clip_score"), 1.0), delta(r, "cider", 100.0), delta(r, "clip_score", 1.0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["images_per_s"], 100 * (r["cider"] or 0))
        ax.annotate(r["strategy"], (r["images_per_s"], 100 * (r["cider"] or 0)), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("images/s (decoding + reranking)")
    ax.set_ylabel("held-out CIDEr")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def save(rows: list[dict[str, Any]], out_dir: str) -> None:
    import pyarrow as pa

    storage.atomic_write_table(pa.Table.from_pylist(rows), storage.join(out_dir, "table.parquet"))
    for name, data in (("table.md", (format_table(rows) + "\n").encode()), ("decoding.png", plot(rows))):
        storage.write_file(storage.join(out_dir, name), data)


def run_decoding_study(cfg: DecodingStudyConfig) -> list[dict[str, Any]]:
    """Load the artifact and the (held-out) rows, run every strategy, save and return the table."""
    from clipcap_core.artifacts import load_model
    from clipcap_core.metrics import scorer_for

    files = tables.list_table_files(cfg.tables)
    info = tables.inspect_tables(files)
    loaded = load_model(cfg.model)
    tables.check_model_dim(info, loaded.model.config.clip_dim, what=f"model artifact {cfg.model}")
    storage.check_writable(cfg.output)
    split = tables.Split(part="heldout" if cfg.heldout_fraction else "all", heldout_fraction=cfg.heldout_fraction)
    held = tables.read_split(files, split, max_rows=cfg.max_rows)
    emb = tables.embeddings_numpy(held)
    refs = [[c] for c in held.column("caption").to_pylist()]
    rows = decoding_study(loaded.model.eval(), loaded.tokenizer, emb, refs, cfg.options,
                          scorer_for(loaded.model.config.encoder, emb.shape[1]))
    save(rows, storage.join(cfg.output, cfg.name))
    return rows
