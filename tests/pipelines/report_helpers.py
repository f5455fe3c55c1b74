"""Builders for the report tests (not a test module): a captioned synthetic archive laid out exactly as
``clipcap caption`` writes it (``captions/`` parts named after the input's parts, ``_meta/run.json`` naming the input), a tiny
model artifact (with a training record in its config.json), an evaluation of the captions and a training history.
``wrong`` plants captions by sample index (the first caption is always the hostile one)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from clipcap_core import synthetic
from pipelines.demo.run import write_archive
from pipelines.io import schemas, sources

HOSTILE = "<script>document.title='pwned'</script> two red circles"  # a caption is untrusted text


TRAINING = {"run": "report-test", "step": 20, "epochs": 2, "tables": ["embeddings/part-0.parquet"], "init": "tiny",
            "train": {"lr": 0.003, "batch_size": 16, "epochs": 2, "warmup_steps": 1}, "input_errors": {}}


def captioned_run(root: Path, n: int = 8, archives: int = 2, wrong: dict[int, str] | None = None) -> dict[str, str]:
    from clipcap_core.artifacts import load_model, save_model

    model = root / "model"
    loaded = load_model("tiny")
    save_model(loaded.model, loaded.tokenizer, str(model), metrics={"cider": 1.23}, extra={"training": TRAINING})
    inp = root / "input"
    samples = list(synthetic.generate(n, seed=5, size=64, start=900))
    per = n // archives
    for a in range(archives):
        write_archive(str(inp / f"shard{a}.tar"), samples[a * per:(a + 1) * per])
    output = root / "caption-run"  # the layout `clipcap caption` writes: captions/ + _meta/run.json
    captions = output / "captions"
    captions.mkdir(parents=True)
    (output / "_meta").mkdir()
    keys: list[str] = []
    for part in sources.plan_parts(str(inp), sources.SourceConfig()):
        rel = part.files[0].rel  # "shard<a>.tar": one part per archive
        a = int(rel[len("shard"):-len(".tar")])
        rows = {name: [] for name in schemas.CAPTIONS_SCORED_SCHEMA.names}
        for s in samples[a * per:(a + 1) * per]:
            key = f"{rel}/{s.key}.png"
            keys.append(key)
            caption = HOSTILE if len(keys) == 1 else (wrong or {}).get(len(keys) - 1, s.caption)
            for rank, text in enumerate((caption, "an alternative caption")):
                for name, v in (("key", key), ("caption", text), ("score", -0.5 - rank), ("model", f"{model}@v1"),
                                ("created_at", None), ("rank", rank), ("clip_score", 0.6 - 0.1 * rank)):
                    rows[name].append(v)
        meta = {schemas.META_MODEL: f"{model}@v1"}
        pq.write_table(pa.table(rows, schema=schemas.with_metadata(schemas.CAPTIONS_SCORED_SCHEMA, meta)),
                       captions / f"part-{part.part_id}.parquet")
    (output / "_meta" / "run.json").write_text(json.dumps({"input": str(inp), "model": f"{model}@v1"}))
    refs = root / "refs.jsonl"
    refs.write_text("".join(json.dumps({"key": f"{s.key}", "caption": s.caption}) + "\n" for s in samples))
    run = root / "run"
    run.mkdir()
    history = [{"kind": "step", "step": s, "train_loss": 3.0 / s} for s in range(1, 21)]
    history += [{"kind": "epoch", "step": s, "epoch": s // 10, "val_loss": 2.5 / s, "bleu4": s / 40,
                 "cider": s / 8, "clip_score": 0.5} for s in (10, 20)]
    (run / "history.json").write_text(json.dumps(history))
    return {"model": str(model), "input": str(inp), "captions": str(output), "refs": str(refs),
            "run": str(run), "keys": keys, "samples": samples}
