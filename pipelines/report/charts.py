"""Charts of ``clipcap report`` as PNG data URIs (matplotlib, Agg backend; embedded, so the file stands alone).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from typing import Any

MIN_STEP_ROWS = 3  # fewer step rows draw no line: plot the epoch rows' train loss instead
HELDOUT = ("exact_match", "bleu4", "cider", "clip_score")  # clipcap_core.metrics.heldout_metrics


def _pyplot() -> Any:
    # lazy: matplotlib.pyplot ~1.1 s to import (python -X importtime)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _data_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def train_loss_points(history: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], str]:
    """(step, train loss) points and their legend: the step rows, or the epoch rows' mean loss when a short run
    logged fewer than ``MIN_STEP_ROWS`` steps (a 64-sample run logs none between its epochs)."""
    def finite(v: Any) -> bool:
        return isinstance(v, (int, float)) and math.isfinite(v)

    steps = [(r["step"], r["train_loss"]) for r in history if r.get("kind") == "step" and finite(r.get("train_loss"))]
    if len(steps) >= MIN_STEP_ROWS:
        return steps, "train loss"
    epochs = [(r["step"], r["train_loss"]) for r in history
              if r.get("kind") == "epoch" and finite(r.get("train_loss"))]
    return (epochs, "train loss (epoch mean)") if len(epochs) > len(steps) else (steps, "train loss")


def training_chart(history: list[dict[str, Any]]) -> str | None:
    """Loss curves (``pipelines.train.job.plot_history``'s data) beside the held-out metrics per epoch."""
    plt = _pyplot()
    epochs = [r for r in history if r.get("kind") == "epoch"]
    steps, label = train_loss_points(history)
    if not steps and not epochs:
        return None
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(10, 3.5), dpi=100)
    if steps:
        loss_ax.plot(*zip(*steps, strict=True), "-" if label == "train loss" else "s-", lw=1, label=label)
    val = [(r["step"], r["val_loss"]) for r in epochs if "val_loss" in r]
    if val:
        loss_ax.plot(*zip(*val, strict=True), "o-", label="held-out loss")
    loss_ax.set(xlabel="step", ylabel="loss", yscale="log", title="loss")
    for name in HELDOUT:
        points = [(r["step"], r[name]) for r in epochs if isinstance(r.get(name), (int, float))]
        if points:
            metric_ax.plot(*zip(*points, strict=True), "o-", label=name)
    metric_ax.set(xlabel="step", title="held-out metrics")
    for ax in (loss_ax, metric_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _data_uri(fig)


def histogram(values: Sequence[float], label: str) -> str | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.hist(values, bins=min(20, max(5, len(values) // 2)), color="#4c72b0")
    ax.set(xlabel=label, ylabel="captions", title=f"{label} of the sampled captions (n={len(values)})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _data_uri(fig)
