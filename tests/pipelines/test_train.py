"""The Ray Train job: data plumbing, model/table checks, checkpoints, history; learning + fault tolerance on Ray."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import random
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from clipcap_core import uris
from clipcap_core.artifacts import load_model, read_metadata, save_model
from clipcap_core.decoding import generate
from clipcap_core.metrics import exact_match
from clipcap_core.training import TrainConfig, collate, make_optimizer_and_scheduler, train_step
from pipelines.demo import synthetic_tables
from pipelines.demo.worlds import synthetic_accuracy
from pipelines.io import storage, tables
from pipelines.train import checkpoints as train_checkpoints
from pipelines.train import job as train
from pipelines.train import runner
from pipelines.train import setup as ts
from pipelines.train import state as train_state
from pipelines.train.checkpoints import load_checkpoint, save_checkpoint
from pipelines.train.state import RunState

CAPTIONS = ["a small red circle at the top", "three large blue squares on the left .", "two"]


@pytest.fixture()
def table_info(tmp_path):
    files = synthetic_tables.write_synthetic_tables(str(tmp_path / "root"), 200, shards=2, dim=24)
    return tables.inspect_tables(files)


def _tiny(info, preset="tiny"):
    cfg = ts.resolve_model_config(preset, {}, info)
    return ts.build_or_load_model(preset, cfg, seed=0)


def test_batch_tokenizer_matches_core_collate(table_info):
    _, tok = _tiny(table_info)
    for max_tokens in (4, 16):
        tokens, mask = ts.BatchTokenizer(tok, max_tokens)(CAPTIONS)
        ref = collate(tok, CAPTIONS, np.zeros((3, 24)), max_tokens)
        assert np.array_equal(tokens, ref.tokens.numpy()) and np.array_equal(mask, ref.mask.numpy())
    assert tokens[0, 7] == tok.eos_token_id and mask[0].sum() == 8  # 7 words + end-of-text


def test_batch_tokenizer_starts_clip_bpe_captions_with_start_of_text():
    from clipcap_core.tokenizer import load_tokenizer

    tok = load_tokenizer("clip-bpe")
    for max_tokens in (3, 20):
        tokens, mask = ts.BatchTokenizer(tok, max_tokens)(CAPTIONS)
        ref = collate(tok, CAPTIONS, np.zeros((3, 24)), max_tokens)
        assert np.array_equal(tokens, ref.tokens.numpy()) and np.array_equal(mask, ref.mask.numpy())
        assert (tokens[:, 0] == tok.bos_token_id).all()
    assert tokens[2, :3].tolist() == [tok.bos_token_id, *tok.encode("two", add_special_tokens=False), tok.eos_token_id]


def test_per_batch_trim_keeps_the_loss(table_info):
    model, tok = _tiny(table_info)
    tokens, mask = ts.BatchTokenizer(tok, 12)(CAPTIONS[:2])
    padded = {"embedding": torch.randn(2, 24), "tokens": torch.from_numpy(np.pad(tokens, ((0, 0), (0, 20)))),
              "mask": torch.from_numpy(np.pad(mask, ((0, 0), (0, 20))))}
    batch = ts.to_core_batch(padded)
    assert batch.tokens.shape == (2, 9)  # 8 words + end-of-text, not 32
    model.eval()
    full = model(padded["embedding"], padded["tokens"], padded["mask"]).loss
    trimmed = model(batch.embeds, batch.tokens, batch.mask).loss
    assert torch.allclose(full, trimmed, atol=1e-6)


def test_preset_takes_dimension_and_encoder_from_the_tables(table_info):
    cfg = ts.resolve_model_config("tiny", {"mapping.kind": "transformer", "mapping.prefix_length": 7,
                                           "mapping.num_layers": 1, "lm.freeze": True}, table_info)
    assert (cfg.clip_dim, cfg.encoder.model_name) == (24, "attr-proj")
    assert (cfg.mapping.kind, cfg.mapping.prefix_length, cfg.lm.freeze) == ("transformer", 7, True)
    with pytest.raises(ValueError, match="unknown key 'prefix_len'"):
        ts.resolve_model_config("tiny", {"mapping.prefix_len": 3}, table_info)
    with pytest.raises(ValueError, match=r"dimension mismatch.*D=24.*clip_dim=128"):
        ts.resolve_model_config("tiny", {"clip_dim": 128}, table_info)


def test_tiny_preset_on_scenes_tables_takes_the_scenes_vocabulary(table_info):
    """Catches a tiny preset trained on scenes captions with the synthetic word vocabulary, which has no
    'left', 'right', plurals like 'diamonds' ...: those captions would train on <unk> tokens."""
    from clipcap_core import scenes
    from clipcap_core.tokenizer import WORD, WORD_SCENES, load_tokenizer

    for clip in ("tiny-scenes", "tiny-scenes-gapped"):
        info = dataclasses.replace(table_info, clip_model=clip)
        cfg = ts.resolve_model_config("tiny", {}, info)
        assert cfg.tokenizer == WORD_SCENES
        tok = ts.load_tokenizer_for("tiny", cfg)
        caption = scenes.references(scenes.sample_scene(random.Random(0)))[3]
        assert tok.unk_token_id not in tok(caption)["input_ids"], caption
    assert load_tokenizer(WORD).unk_token_id in load_tokenizer(WORD)(caption)["input_ids"]  # the gap it closes
    # other CLIPs keep the preset's vocabulary, and an explicit override wins
    assert ts.resolve_model_config("tiny", {}, table_info).tokenizer == WORD
    info = dataclasses.replace(table_info, clip_model="tiny-scenes")
    assert ts.resolve_model_config("tiny", {"tokenizer": WORD}, info).tokenizer == WORD


def test_artifact_with_another_dimension_is_refused_before_training(tmp_path, table_info, monkeypatch):
    other = tables.inspect_tables(synthetic_tables.write_synthetic_tables(str(tmp_path / "o"), 50, dim=16))
    model, tok = _tiny(other)
    save_model(model, tok, str(tmp_path / "m16"))
    with pytest.raises(ValueError, match=r"dimension mismatch.*D=24.*artifact.*clip_dim=16"):
        ts.resolve_model_config(str(tmp_path / "m16"), {}, table_info)
    with pytest.raises(ValueError, match="presets only"):
        ts.resolve_model_config(str(tmp_path / "m16"), {"mapping.prefix_length": 2}, table_info)
    # Same D, another CLIP: refused too (the embeddings live in another space).
    same_d = tables.inspect_tables(synthetic_tables.write_synthetic_tables(str(tmp_path / "v"), 50, dim=16, tag="my-clip"))
    with pytest.raises(ValueError, match="CLIP mismatch.*'my-clip'.*'attr-proj'"):
        ts.resolve_model_config(str(tmp_path / "m16"), {}, same_d)
    assert ts.resolve_model_config(str(tmp_path / "m16"), {}, other).clip_dim == 16

    def no_trainer(*a, **k):
        raise AssertionError("a trainer was created despite the dimension mismatch")

    import ray.train.torch

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", no_trainer)
    job = train.TrainJobConfig(tables=table_info.files, output=str(tmp_path / "runs"), model=str(tmp_path / "m16"))
    with pytest.raises(ValueError, match="dimension mismatch"):
        train.run_training(job)
    assert not (tmp_path / "runs").exists()


def test_plan_counts_equal_shards(table_info, tmp_path):
    job = train.TrainJobConfig(tables=table_info.files, output=str(tmp_path), heldout_fraction=0.2,
                               train=TrainConfig(batch_size=16, epochs=3), scale=train_state.ScaleConfig(num_workers=3))
    plan = train.plan_training(job)
    n_train = tables.count_split(table_info.files, job.split())
    assert plan.n_train == n_train and 140 < n_train < 180
    assert plan.total_steps == math.ceil((3 * n_train // 3) / 16) and plan.stream_start_epoch == 0
    assert plan.epoch_ends == (round(plan.total_steps / 3), round(2 * plan.total_steps / 3))
    # A resumed run streams from the latest epoch whose stream still reaches back to the earliest stored
    # checkpoint (so it is never skipped past), and the stream still ends at total_steps.
    total = plan.total_steps

    def first_step(e):  # where a stream of epochs e..2 starts: it holds (3 - e) * n_train // 3 rows per worker
        return total - math.ceil(((3 - e) * n_train // 3) / 16)

    starts = []
    for step in range(0, total + 1):
        with mock.patch.object(train_checkpoints, "stored_checkpoint_steps", return_value=[step, total]):
            p = train.plan_training(job)
        e = p.stream_start_epoch
        assert p.stream_first_step == first_step(e) <= step and (e == 3 or first_step(e + 1) > step), step
        assert p.total_steps == total
        starts.append(e)
    assert starts == sorted(starts) and starts[0] == 0 and starts[-1] == 3 and set(starts) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="at least one"):
        train.TrainJobConfig(tables=(), output="x")


def test_checkpoint_round_trip_leaves_a_frozen_lm_out(tmp_path, table_info):
    model, tok = _tiny(table_info, "tiny-transformer")
    hp = TrainConfig(lr=1e-3, warmup_steps=2)
    opt, sched = make_optimizer_and_scheduler(model, hp, 10)
    batch = collate(tok, CAPTIONS, np.random.default_rng(0).standard_normal((3, 24)), 16)
    for _ in range(3):
        train_step(model, batch, opt, sched, hp)
    state = RunState(step=3, epoch=0, attempt=1, history=[{"kind": "step", "step": 3}])
    frozen_lm = {k: v for k, v in model.state_dict().items() if not k.startswith("lm.")}  # ClipCapRun's weights
    save_checkpoint(str(tmp_path), frozen_lm, opt, sched, state)
    saved = torch.load(tmp_path / "weights.pt", weights_only=True)
    assert saved["model"] and not any(k.startswith("lm.") for k in saved["model"])
    stored = json.loads((tmp_path / "state.json").read_text())
    assert stored == {"step": 3, "epoch": 0, "attempt": 1, "history": [{"kind": "step", "step": 3}]}  # the format

    fresh, _ = _tiny(table_info, "tiny-transformer")
    opt2, sched2 = make_optimizer_and_scheduler(fresh, hp, 10)
    from ray.train import Checkpoint

    restored = load_checkpoint(Checkpoint.from_directory(str(tmp_path)), fresh, opt2, sched2, may_miss="lm.")
    assert restored == state and sched2.last_epoch == 3
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # Training continues identically from the restored state.
    assert train_step(model, batch, opt, sched, hp) == pytest.approx(train_step(fresh, batch, opt2, sched2, hp))


def test_resume_from_a_checkpoint_of_another_model_fails_clearly(tmp_path, table_info):
    """Resuming with a checkpoint of another model fails with a clear message."""
    from ray.train import Checkpoint

    model, _ = _tiny(table_info, "tiny-transformer")
    hp = TrainConfig(lr=1e-3, warmup_steps=2)
    opt, sched = make_optimizer_and_scheduler(model, hp, 10)
    save_checkpoint(str(tmp_path), model.state_dict(), opt, sched, RunState(step=1))
    other, _ = _tiny(table_info, "tiny")  # an MLP mapping: other keys
    before = {k: v.clone() for k, v in other.state_dict().items()}
    opt2, sched2 = make_optimizer_and_scheduler(other, hp, 10)
    with pytest.raises(RuntimeError, match="checkpoint does not fit the model: missing .*mapping"):
        load_checkpoint(Checkpoint.from_directory(str(tmp_path)), other, opt2, sched2, may_miss="lm.")
    assert sched2.last_epoch == 0  # nothing restored half-way into the optimizer / schedule
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items() if k.startswith("mapping."))


def test_attribute_accuracy_against_chance():
    refs = ["a small red circle at the top", "two large blue squares on the left"]
    preds = ["a small red circle at the top.", "two large green squares on the right"]
    scores = synthetic_accuracy(preds, refs)
    acc, chance = scores["accuracy"], scores["chance"]
    assert acc == {"exact": 0.5, "count": 1.0, "size": 1.0, "color": 0.5, "shape": 1.0, "position": 0.5}
    assert chance["color"] == pytest.approx(1 / 6) and chance["exact"] == pytest.approx(1 / 432)
    assert synthetic_accuracy(["not a caption"], refs[:1])["accuracy"]["size"] == 0.0


def test_history_json_csv_and_loss_curve(tmp_path):
    history = [{"kind": "step", "step": s, "epoch": 0, "train_loss": 3.0 / s, "samples_per_s": 100.0,
                "attempt": 1} for s in range(1, 11)]
    history.insert(5, {"kind": "resume", "step": 4, "epoch": 0, "attempt": 2})
    history.append({"kind": "epoch", "step": 10, "epoch": 1, "train_loss": 0.5, "val_loss": 0.6, "attempt": 2})
    run_dir = storage.join(str(tmp_path), "run")
    runner.write_history(history, run_dir)
    assert json.loads((tmp_path / "run/history.json").read_text()) == history
    lines = (tmp_path / "run/history.csv").read_text().splitlines()
    assert lines[0].split(",")[:3] == ["kind", "step", "epoch"] and len(lines) == len(history) + 1
    img = Image.open(io.BytesIO((tmp_path / "run/loss_curve.png").read_bytes()))
    assert img.format == "PNG" and img.size[0] >= 400
    assert len(set(np.asarray(img.convert("L")).ravel().tolist())) > 10  # something was drawn


# --- on the real local Ray cluster ---------------------------------------------------------------------------
FAST = TrainConfig(epochs=2, batch_size=32, lr=1e-2, warmup_steps=10, max_caption_tokens=16)


def _caption_accuracy(artifact: str, files: list[str]) -> float:
    held = tables.read_split(files, tables.Split(part="heldout"))
    loaded = load_model(artifact)
    texts = generate(loaded.model, tables.embeddings_numpy(held), loaded.tokenizer, "greedy", max_length=16).texts
    return exact_match(texts, held.column("caption").to_pylist())


@pytest.mark.slow  # `make test-slow`: out of `make test`, which must stay well under 20 min on 2 cores
@pytest.mark.integration
def test_two_workers_learn_and_survive_a_killed_worker(ray_cluster, tmp_path):
    files = synthetic_tables.write_synthetic_tables(str(tmp_path / "data"), 1200, shards=2, dim=32)
    job = train.TrainJobConfig(
        tables=(str(tmp_path / "data/embeddings"),), output=str(tmp_path / "runs"), name="learn", train=FAST,
        run=train_state.RunOptions(checkpoint_every=5, log_every=5, max_failures=1, keep_checkpoints=2),
        scale=train_state.ScaleConfig(num_workers=2, cpus_per_worker=0.5),
        fault=train_state.FaultConfig(crash_at_step=13, rank=1, marker=str(tmp_path / "crashed.json")))
    plan = train.plan_training(job)
    result = train.run_training(job)

    # The model learned: held-out captions from the saved artifact are mostly exactly right (chance ~1/432).
    assert _caption_accuracy(result.artifact, files) >= 0.3  # chance is 1/432; a fresh clone under heavy load measured 0.45 after 2 epochs
    epochs = [r for r in result.history if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs][-1] == 2 and epochs[-1]["val_loss"] < 0.5 * epochs[0]["train_loss"]
    # Rank 1 died at step 13; the group restarted from a checkpoint (not from zero) and finished every step.
    assert json.loads((tmp_path / "crashed.json").read_text())["step"] == 13
    resumes = [r for r in result.history if r["kind"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["attempt"] == 2
    ends = plan.epoch_ends
    assert 0 < resumes[0]["step"] <= 13 and (resumes[0]["step"] % 5 == 0 or resumes[0]["step"] in ends)
    after = [r["step"] for r in result.history if r.get("attempt") == 2 and r["kind"] != "resume"]
    assert min(after) > resumes[0]["step"] and epochs[-1]["step"] == plan.total_steps
    # Outputs: history, loss curve, at most keep_checkpoints checkpoints, the artifact.
    run_dir = tmp_path / "runs/learn"
    assert {"history.json", "history.csv", "loss_curve.png", "model"} <= {p.name for p in run_dir.iterdir()}
    assert 1 <= len(list(run_dir.glob("checkpoint_0*"))) <= 2
    assert json.loads((run_dir / "model/config.json").read_text())["training"]["step"] == plan.total_steps


@pytest.mark.integration
def test_rerun_with_the_same_name_resumes_on_s3(ray_cluster, s3_uri):
    files = synthetic_tables.write_synthetic_tables(storage.join(s3_uri, "data"), 400, shards=1, dim=16)
    job = train.TrainJobConfig(
        tables=tuple(files), output=storage.join(s3_uri, "runs"), name="again", model="tiny-transformer",
        model_overrides={"mapping.prefix_length": 3, "mapping.clip_length": 3},  # frozen LM: not checkpointed
        train=TrainConfig(epochs=2, batch_size=32, lr=1e-2, warmup_steps=5, max_caption_tokens=16),
        run=train_state.RunOptions(checkpoint_every=4, log_every=2, max_failures=0),
        scale=train_state.ScaleConfig(num_workers=1, cpus_per_worker=0.5),
        fault=train_state.FaultConfig(crash_at_step=9, marker=storage.join(s3_uri, "crashed.json")))
    with pytest.raises(Exception, match="(?i)fail|died|error"):
        train.run_training(job)  # no retries allowed: the run fails at step 9
    assert uris.exists(storage.join(s3_uri, "runs/again/checkpoint_00000008")) or uris.exists(
        storage.join(s3_uri, "runs/again/checkpoint_00000004"))
    # Same output + name, through the CLI this time: resumes from the stored checkpoint.
    from pipelines.cli import main

    assert main(["train", "--input", *files, "--output", job.output, "--name", "again", "--model", "tiny-transformer",
                 "--prefix-length", "3", "--set", "model_overrides.mapping.clip_length=3", "--epochs", "2",
                 "--batch-size", "32", "--lr", "0.01", "--warmup-steps", "5", "--max-caption-tokens", "16",
                 "--checkpoint-every", "4", "--log-every", "2", "--max-failures", "0", "--workers", "1",
                 "--cpus-per-worker", "0.5"]) == 0
    history = storage.read_json(storage.join(job.run_dir, "history.json"))
    result = train.TrainJobResult(artifact=storage.join(job.run_dir, "model"), run_dir=job.run_dir, history=history,
                                  metrics={})
    resumes = [r for r in result.history if r["kind"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] in (4, 8)
    steps = [r["step"] for r in result.history if r["kind"] == "step"]
    assert steps == sorted(set(steps)) and min(s for s in steps if s > resumes[0]["step"]) <= resumes[0]["step"] + 2
    assert [r["step"] for r in result.history if r["kind"] == "epoch"][-1] == train.plan_training(job).total_steps
    model_cfg = read_metadata(result.artifact)["model"]
    assert (model_cfg["mapping"]["kind"], model_cfg["mapping"]["prefix_length"], model_cfg["lm"]["freeze"]) == (
        "transformer", 3, True)
    assert uris.exists(storage.join(s3_uri, "runs/again/loss_curve.png"))
