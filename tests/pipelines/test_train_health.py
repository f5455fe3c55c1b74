"""``clipcap train`` on bad input and bad runs: rows that cannot train are dropped and counted (or refused with
``--strict``), a table that contradicts its metadata is refused before any work, a NaN model is refused by the
captioner, a loss that never fell is a warning and nightly refuses it."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from clipcap_core import training
from pipelines.cli import main
from pipelines.demo import synthetic_tables
from pipelines.io import schemas, tables
from pipelines.train import job as train
from pipelines.train import nightly
from pipelines.train import state as train_state
from pipelines.train.steps import loss_health


def _poison(uri: str, *, nan_row: int, null_row: int, dup_of: tuple[int, int]) -> pa.Table:
    """Rewrite table ``uri`` with a NaN in one vector, a null caption, and row dup_of[1] keyed as dup_of[0]."""
    table = pq.read_table(uri)
    emb = tables.embeddings_numpy(table).copy()
    emb[nan_row, 0] = np.nan
    keys = table.column(schemas.KEY).to_pylist()
    keys[dup_of[1]] = keys[dup_of[0]]
    caps = table.column(schemas.CAPTION).to_pylist()
    caps[null_row] = None
    d = emb.shape[1]
    out = table.set_column(table.schema.get_field_index(schemas.IMAGE_EMBEDDING), table.schema.field(schemas.IMAGE_EMBEDDING),
                           pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel(), pa.float32()), d))
    out = out.set_column(0, table.schema.field(schemas.KEY), pa.array(keys))
    out = out.set_column(1, table.schema.field(schemas.CAPTION), pa.array(caps, pa.string()))
    pq.write_table(out.replace_schema_metadata(table.schema.metadata), uri)
    return out


def test_rows_that_cannot_train_are_dropped_counted_and_never_reach_a_batch(tmp_path):
    files = synthetic_tables.write_synthetic_tables(str(tmp_path / "d"), 120, shards=2, dim=24)
    _poison(files[0], nan_row=3, null_row=5, dup_of=(1, 7))
    job = train.TrainJobConfig(tables=tuple(files), output=str(tmp_path / "runs"), heldout_fraction=0.0)
    plan, audit = train.plan_and_audit(job)
    assert plan.input_errors == {"duplicate key": 1, "empty caption": 1, "non-finite vector": 1}
    assert plan.repeats == {files[0]: (7,)} and plan.n_train == 117
    assert sorted(audit.errors.column("stage").to_pylist()) == ["train-input"] * 3
    # The rows the model reads are exactly the counted ones: no NaN, no null caption, the first row of a key only.
    kept = tables.read_split(files, job.split(), repeats=plan.repeats)
    assert kept.num_rows == 117 and np.isfinite(tables.embeddings_numpy(kept)).all()
    assert len(set(kept.column(schemas.KEY).to_pylist())) == 117
    with pytest.raises(ValueError, match=r"--strict: 3 row\(s\) cannot train"):
        train.plan_training(train.TrainJobConfig(tables=tuple(files), output=str(tmp_path / "runs"), strict=True))


def test_a_prepared_block_drops_the_same_rows_as_the_count(tmp_path):
    files = synthetic_tables.write_synthetic_tables(str(tmp_path / "d"), 60, dim=8)
    _poison(files[0], nan_row=0, null_row=1, dup_of=(2, 3))
    audit = tables.audit_tables(files)
    prep = tables.ReadPrepare(lambda caps: (np.ones((len(caps), 2), np.int64), np.ones((len(caps), 2), np.float32)),
                              4, rows_per_block=16)
    split = tables.Split(part="all", heldout_fraction=0.0)
    import dataclasses

    blocks = list(prep({"uri": np.array([files[0]]), "split": np.array([json.dumps(dataclasses.asdict(split))]),
                        "drop": np.array([json.dumps(list(audit.repeats[files[0]]))])}))
    assert sum(len(b["tokens"]) for b in blocks) == 57 == tables.count_split(files, split, repeats=audit.repeats)
    assert all(np.isfinite(b["embedding"]).all() for b in blocks)


def test_a_table_whose_metadata_names_another_clip_is_refused_before_any_work(tmp_path, capsys):
    # metadata says the tiny CLIP (D=128) but the vectors have D=64
    files = synthetic_tables.write_synthetic_tables(str(tmp_path / "d"), 40, dim=64, tag="tiny")
    code = main(["train", "--input", *files, "--output", str(tmp_path / "runs"), "--model", "tiny"])
    assert code == 2
    assert "metadata says CLIP 'tiny' (D=128) but the vectors have D=64" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_model_with_nan_weights_is_refused_by_caption_before_any_work(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from clipcap_core.artifacts import load_model, save_model
    from tests.pipelines.image_zoo import good_images

    loaded = load_model("tiny")
    model = tmp_path / "nan-model"
    save_model(loaded.model, loaded.tokenizer, str(model))
    state = load_file(str(model / "mapping.safetensors"))
    for k in state:
        state[k] = torch.full_like(state[k], float("nan"))
    save_file(state, str(model / "mapping.safetensors"), metadata={"format": "pt"})
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "a.jpg").write_bytes(good_images()["rgb.jpg"])
    code = main(["caption", "--input", str(inp), "--output", str(tmp_path / "out"), "--model", str(model)])
    assert code == 2
    assert "mapping.safetensors is corrupt: non-finite" in capsys.readouterr().err
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]  # no run record, no table


def test_a_loss_that_did_not_fall_is_a_warning_and_nightly_refuses_it():
    flat = [{"kind": "step", "step": s, "train_loss": 4.33} for s in range(50, 700, 50)]
    health = loss_health(flat, 679)
    assert health["loss_fell"] is False and "did not fall" in health["warning"]
    learned = [{"kind": "step", "step": s, "train_loss": 4.0 / s} for s in range(50, 700, 50)]
    assert loss_health(learned, 679)["loss_fell"] is True
    assert loss_health(flat[:1], 679) == {}  # too short to tell: no verdict
    ok = {"val_loss": 1.0, "cider": 2.0}
    assert nightly.decide(ok, None, "cider", 0.0, health)[0] is False
    assert nightly.decide(ok, None, "cider", 0.0, loss_health(learned, 679))[0] is True


@pytest.mark.integration
def test_a_nan_vector_gives_a_counted_dropped_row_and_a_finite_model(ray_cluster, tmp_path):
    from clipcap_core.artifacts import load_model

    files = synthetic_tables.write_synthetic_tables(str(tmp_path / "d"), 128, dim=24)
    _poison(files[0], nan_row=10, null_row=11, dup_of=(12, 13))
    job = train.TrainJobConfig(tables=tuple(files), output=str(tmp_path / "runs"), name="poisoned",
                               train=training.TrainConfig(epochs=2),
                               run=train_state.RunOptions(log_every=2, checkpoint_every=10**6))
    result = train.run_training(job)
    assert result.input_errors == {"duplicate key": 1, "empty caption": 1, "non-finite vector": 1}
    errors = pq.read_table(tmp_path / "runs/poisoned/input_errors.parquet").to_pylist()
    assert sorted(r["error"] for r in errors) == ["duplicate key", "empty caption", "non-finite vector"]
    model = load_model(result.artifact).model
    assert all(bool(torch.isfinite(v).all()) for v in model.state_dict().values())
    assert all(np.isfinite(r["train_loss"]) for r in result.history if "train_loss" in r)
    recorded = json.loads((tmp_path / "runs/poisoned/model/config.json").read_text())["training"]
    assert recorded["train"]["lr"] == 3e-3 and recorded["input_errors"]["non-finite vector"] == 1
    recipe = result.history[0]  # the run record opens with the effective recipe
    assert recipe["kind"] == "recipe" and recipe["recipe_lr"] == 3e-3 and recipe["recipe_epochs"] == 2
    assert recipe["dropped_non-finite_vector"] == 1



def test_a_caption_run_whose_captions_are_mostly_empty_says_so_in_its_exit_code(tmp_path):
    from clipcap_core.decoding import DecodeConfig
    from pipelines import exitcodes
    from pipelines.caption.job import CaptionSummary
    from pipelines.caption.output import PartCommitter

    committer = PartCommitter(str(tmp_path / "out"), "m@1", DecodeConfig())
    rows = pa.Table.from_pylist([{"key": f"k{i}", "index": i, "error": None, "source": "s", "stage": None,
                                  "captions": ["" if i < 3 else "a red circle"], "scores": [-1.0],
                                  "clip_scores": [0.5]} for i in range(5)])
    assert committer.commit("p0", rows) == ("p0", 5, 5, 5) and committer.empty_captions == 3
    summary = CaptionSummary(output="o", model="m", parts_total=1, parts_done=1, images=5, captioned=5,
                             empty_captions=committer.empty_captions)
    assert summary.mostly_empty and summary.exit_code == exitcodes.UNHEALTHY
    summary.empty_captions = 2
    assert summary.exit_code == exitcodes.OK
