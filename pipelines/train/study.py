"""``clipcap study prefix``: prefix length x mapping x LM (frozen or tuned) x seeds, each a Ray Tune trial of the
sweep, scored on held-out rows with ``clipcap evaluate``'s metrics, reduced to mean and spread over seeds.
"""

from __future__ import annotations

import dataclasses
import io
import statistics
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ray import tune

from clipcap_core.configs import from_dict, to_dict
from clipcap_core.training import TrainConfig
from pipelines.io import storage, tables
from pipelines.train import sweep

METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "clip_score")
SETTING = ("mapping", "prefix_length", "lm")
LM_FREEZE = {"frozen": True, "tuned": False}


@dataclass(frozen=True, kw_only=True)
class StudyConfig:
    """The ``clipcap study prefix`` config: each field is a flag."""

    CLI_FLAGS: ClassVar[dict[str, str | None]] = {
        "tables": "--input", "presets": None, "model_overrides": None, "metrics": None, "train.warmup_steps": None,
        "train.warmup_fraction": None, "train.precision": None, "train.seed": None,
        "train.max_caption_tokens": None, "train.weight_decay": None,
    }
    tables: tuple[str, ...]  # embedding table folders or files
    output: str  # where the tables, plot and Tune state go: <output>/<name>/
    name: str = "prefix-study"  # study name
    prefix_lengths: tuple[int, ...] = (1, 10, 20)  # prefix lengths k tried
    mappings: tuple[Literal["mlp", "transformer"], ...] = ("mlp", "transformer")  # mapping networks tried
    lms: tuple[Literal["frozen", "tuned"], ...] = ("frozen", "tuned")  # the LM frozen or fine-tuned
    seeds: tuple[int, ...] = (0, 1, 2)  # training seeds per setting
    presets: dict[str, str] = field(default_factory=lambda: {"mlp": "tiny", "transformer": "tiny-transformer"})
    model_overrides: dict[str, Any] = field(default_factory=dict)  # dotted, every setting (e.g. tokenizer)
    train: TrainConfig = field(default_factory=TrainConfig)
    heldout_fraction: float = 0.1  # fraction of keys held out for evaluation
    eval_max_samples: int = 500  # held-out rows captioned per trial at most
    max_train_rows: int = 100_000  # training rows per trial at most
    tokenize: Literal["ptb", "simple"] = "ptb"  # ptb: the COCO tokenizer (Java), as `clipcap evaluate`
    metrics: tuple[str, ...] = ("bleu", "meteor", "rouge", "cider")  # COCO metrics (METEOR needs Java)
    trial_cpus: float = 1.0  # CPUs per trial
    trial_gpus: float = 0.0  # GPUs per trial
    max_concurrent: int = 0  # trials running at once at most (0: as many as resources allow)

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        self.sweep()  # prefix lengths and presets are checked where the sweep checks them

    def sweep(self) -> sweep.SweepConfig:
        """The sweep config of the same fields (the trials train through ``sweep.train_setting``)."""
        return sweep.SweepConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(sweep.SweepConfig)})


def _trial(config: dict[str, Any]) -> None:
    """One (setting, seed): train, caption the held-out rows greedily, report every metric."""
    from clipcap_core.decoding import generate
    from clipcap_core.metrics import evaluate_predictions, scorer_for
    from clipcap_core.model import trainable_parameters

    study = from_dict(StudyConfig, config["study"])
    mapping, k, lm, seed = config["mapping"], int(config["prefix_length"]), config["lm"], int(config["seed"])
    run = sweep.train_setting(study.sweep(), mapping, k, freeze_lm=LM_FREEZE[lm], seed=seed)
    emb = tables.embeddings_numpy(run.heldout)
    texts = generate(run.model, emb, run.tokenizer, "greedy", max_length=run.max_tokens).texts
    refs = [[c] for c in run.heldout.column("caption").to_pylist()]
    ev = evaluate_predictions(texts, refs, metrics=study.metrics, tokenize=study.tokenize, spice="off", image_emb=emb,
                              scorer=scorer_for(run.model.config.encoder, emb.shape[1]))
    tune.report({**{m: ev.summary.get(m) for m in METRICS}, "mapping": mapping, "prefix_length": k, "lm": lm,
                 "seed": seed, "trainable_params": sum(p.numel() for p in trainable_parameters(run.model)),
                 "train_rows": run.train_rows, "heldout_rows": len(texts), "train_loss": run.train_loss,
                 "seconds": run.seconds, "example": texts[0] if texts else ""})


TRIAL_COLUMNS = (*SETTING, "seed", *METRICS, "trainable_params", "train_rows", "heldout_rows", "train_loss",
                 "seconds", "example")


def run_prefix_study(cfg: StudyConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every (mapping, prefix length, LM, seed) as a Tune trial; returns (trial rows, setting rows), saved."""
    space = {"study": to_dict(cfg), "mapping": tune.grid_search(list(cfg.mappings)),
             "prefix_length": tune.grid_search(list(cfg.prefix_lengths)), "lm": tune.grid_search(list(cfg.lms)),
             "seed": tune.grid_search(list(cfg.seeds))}
    metrics = sweep.run_trials(cfg.sweep(), _trial, space, "study")
    trials = sorted(({c: m.get(c) for c in TRIAL_COLUMNS} for m in metrics),
                    key=lambda r: (str(r["mapping"]), int(r["prefix_length"]), str(r["lm"]), int(r["seed"])))
    table = summarize(trials)
    save(trials, table, storage.join(cfg.output, cfg.name))
    return trials, table


def summarize(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per setting: mean and standard deviation over seeds (0 with one seed) of every metric."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for t in trials:
        groups.setdefault(tuple(t[c] for c in SETTING), []).append(t)
    rows = []
    for key, runs in groups.items():
        row: dict[str, Any] = dict(zip(SETTING, key, strict=True))
        row["seeds"] = len(runs)
        for m in (*METRICS, "seconds"):
            values = [float(r[m]) for r in runs if r.get(m) is not None]
            row[f"{m}_mean"] = statistics.fmean(values) if values else None
            row[f"{m}_std"] = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)
        row["trainable_params"] = int(runs[0]["trainable_params"])
        row["train_rows"] = int(runs[0]["train_rows"])
        rows.append(row)
    return rows


def spreads(table: list[dict[str, Any]], metric: str = "cider") -> dict[str, float]:
    """Spread between settings (std of the setting means) and over seeds (mean of the settings' seed std)."""
    means = [r[f"{metric}_mean"] for r in table if r.get(f"{metric}_mean") is not None]
    stds = [r[f"{metric}_std"] for r in table if r.get(f"{metric}_std") is not None]
    return {"between_settings": statistics.stdev(means) if len(means) > 1 else 0.0,
            "over_seeds": statistics.fmean(stds) if stds else 0.0}


def _cell(row: dict[str, Any], m: str, scale: float) -> str:
    mean, std = row.get(f"{m}_mean"), row.get(f"{m}_std")
    if mean is None:
        return "-"
    return f"{scale * mean:.2f} ± {scale * std:.2f}" if row["seeds"] > 1 else f"{scale * mean:.2f}"


def format_table(table: list[dict[str, Any]]) -> str:
    """Markdown: metrics x100 as papers print them (CLIPScore as is), mean ± std over seeds."""
    head = ["mapping", "k", "LM", "seeds", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr",
            "CLIPScore", "train s", "trainable params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["mapping"], str(r["prefix_length"]), r["lm"], str(r["seeds"]),
                 *(_cell(r, m, 1.0 if m == "clip_score" else 100.0) for m in METRICS),
                 _cell(r, "seconds", 1.0), f"{r['trainable_params']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    s = spreads(table)
    lines.append(f"\nCIDEr spread between settings (std of the setting means): {100 * s['between_settings']:.2f}; "
                 f"over seeds (mean of the settings' std): {100 * s['over_seeds']:.2f}.")
    return "\n".join(lines)


def plot(table: list[dict[str, Any]]) -> bytes:
    """PNG: CIDEr and BLEU-4 (x100) against prefix length, one line per (mapping, LM), bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, m, label in zip(axes, ("cider", "bleu4"), ("CIDEr", "BLEU-4"), strict=True):
        for (mapping, lm) in sorted({(r["mapping"], r["lm"]) for r in table}):
            rows = sorted((r for r in table if (r["mapping"], r["lm"]) == (mapping, lm)),
                          key=lambda r: r["prefix_length"])
            ax.errorbar([r["prefix_length"] for r in rows], [100 * (r[f"{m}_mean"] or 0) for r in rows],
                        yerr=[100 * (r[f"{m}_std"] or 0) for r in rows], marker="o", capsize=3,
                        label=f"{mapping}, LM {lm}")
        ax.set_xlabel("prefix length k")
        ax.set_ylabel(f"held-out {label}")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def save(trials: list[dict[str, Any]], table: list[dict[str, Any]], out_dir: str) -> None:
    import pyarrow as pa

    storage.atomic_write_table(pa.Table.from_pylist(trials), storage.join(out_dir, "trials.parquet"))
    storage.atomic_write_table(pa.Table.from_pylist(table), storage.join(out_dir, "table.parquet"))
    for name, data in (("table.md", (format_table(table) + "\n").encode()), ("prefix.png", plot(table))):
        storage.write_file(storage.join(out_dir, name), data)
