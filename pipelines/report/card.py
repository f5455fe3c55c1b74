"""The model card of ``clipcap report``, built from the artifact's ``config.json`` and ``metrics.json``: the CLIP
and where its weights come from, mapping and LM, the training data and recipe (``training.train``), and the
metrics (the artifact's, else this report's evaluation), so the card says what the model is however thin its
README.
"""

from __future__ import annotations

import logging
from typing import Any

from clipcap_core.encoders import describe_weights
from pipelines.io import storage

log = logging.getLogger(__name__)
Section = tuple[str, list[tuple[str, str]]]  # (title, [(name, value)])
SHOW_TABLES = 3  # training tables named on the card (the rest counted)


def _model_rows(meta: dict[str, Any]) -> list[tuple[str, str]]:
    m = meta["model"]
    enc, lm = m["encoder"], m["lm"]
    return [("CLIP", describe_weights(enc["model_name"], enc.get("pretrained"))),
            ("CLIP embedding size D", str(m["clip_dim"])),
            ("mapping", f"{m['mapping']['kind']}, prefix length {m['mapping']['prefix_length']}"),
            ("language model", f"{lm['name_or_path']} ({'frozen' if lm.get('freeze') else 'fine-tuned'})"),
            ("created", f"{meta.get('created_at', '?')} with clipcap-pipeline {meta.get('code_version', '?')}")]


def _data_rows(training: dict[str, Any]) -> list[tuple[str, str]]:
    tables = list(training.get("tables") or [])
    named = ", ".join(tables[:SHOW_TABLES]) + (f" and {len(tables) - SHOW_TABLES} more" if len(tables) > SHOW_TABLES
                                                else "")
    dropped = training.get("input_errors") or {}
    rows = [("training tables", f"{len(tables)}: {named}" if tables else "not recorded"),
            ("run", str(training.get("run", "?"))), ("initialised from", str(training.get("init", "?"))),
            ("trained", f"{training.get('step', '?')} steps, {training.get('epochs', '?')} epochs"),
            ("rows dropped before training", ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items())) or "none")]
    if training.get("replay"):
        rows.append(("replayed tables", f"{len(training['replay'])} (fraction {training.get('replay_fraction')})"))
    return rows


def _metric_rows(metrics: dict[str, Any], eval_metrics: list[tuple[str, str, str, str]]) -> list[tuple[str, str]]:
    if metrics:
        return [(k, f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in sorted(metrics.items())]
    if eval_metrics:
        return [(f"{label} (this report's evaluation, x100)", f"{value} of {scale}")
                for label, value, scale, _ in eval_metrics]
    return [("metrics", "none recorded with the model and no --evaluation given")]


def card_sections(uri: str | None, eval_metrics: list[tuple[str, str, str, str]]) -> list[Section]:
    """Sections of the card of the artifact at ``uri`` ([] when it has no readable config.json)."""
    # lazy: safetensors.torch + torch ~6.7 s, transformers ~1.4 s to import (python -X importtime)
    from clipcap_core.artifacts import read_metadata

    if not uri:
        return []
    try:
        meta = read_metadata(uri)
    except Exception as exc:  # noqa: BLE001 - the report goes on and says the card is missing
        log.warning("report: cannot read the config of model %s: %s", uri, exc)
        return []
    metrics = storage.read_json(storage.join(uri, "metrics.json")) or {}
    training = meta.get("training") or {}
    train = training.get("train") or {}
    recipe = [(k, "default" if v is None else str(v)) for k, v in train.items()] or [
        ("recipe", "not recorded (an imported or untrained model)")]
    sections: list[Section] = [("Model", _model_rows(meta)), ("Metrics", _metric_rows(metrics, eval_metrics))]
    if training:
        sections.append(("Data", _data_rows(training)))
    sections.append(("Training recipe", recipe))
    return sections
