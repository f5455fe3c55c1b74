"""Nightly retraining: watermark, fixed held-out set, guarded promotion, pointer + history; the schedules."""

from __future__ import annotations

import dataclasses
import shlex
import time
from pathlib import Path

import pytest
import yaml

from clipcap_core import uris
from clipcap_core.training import TrainConfig
from pipelines.demo import synthetic_tables
from pipelines.io import storage
from pipelines.lease import Lease, LeaseHeld
from pipelines.train import nightly
from pipelines.train.state import RunOptions, ScaleConfig

ROOT = Path(__file__).resolve().parents[2]


def test_decide_respects_direction_tolerance_and_finite_loss():
    prod = {"cider": 5.0, "val_loss": 0.50}
    assert nightly.decide({"cider": 4.99, "val_loss": 0.4}, prod, "cider", 0.02)[0]  # within tolerance
    ok, why = nightly.decide({"cider": 4.9, "val_loss": 0.4}, prod, "cider", 0.02)
    assert not ok and "worse by 0.1000" in why
    assert nightly.decide({"cider": 1.0, "val_loss": 0.45}, prod, "val_loss", 0.0)[0]  # lower loss is better
    assert not nightly.decide({"cider": 9.0, "val_loss": 0.6}, prod, "val_loss", 0.05)[0]
    ok, why = nightly.decide({"cider": 9.0, "val_loss": float("nan")}, prod, "cider", 1.0)
    assert not ok and "not finite" in why
    ok, why = nightly.decide({"cider": 0.1, "val_loss": 3.0}, None, "cider", 0.0)
    assert ok and "no production" in why


def test_new_shards_are_unseen_or_rewritten():
    manifest = {"shards": {"a": 10, "b": 20}}
    assert nightly.new_shards({"a": 10, "b": 20}, manifest) == []
    assert nightly.new_shards({"a": 10, "b": 21, "c": 5}, manifest) == ["b", "c"]
    assert nightly.new_shards({"a": 10}, None) == ["a"]


def test_a_night_is_refused_while_another_holds_the_lock_and_runs_once_it_is_stale(tmp_path, monkeypatch):
    files = synthetic_tables.write_synthetic_tables(str(tmp_path / "d"), 60, shards=2, dim=8)
    state = str(tmp_path / "state")
    other = Lease(storage.join(state, "lock.json"), run="night-1")
    other.acquire()
    cfg = nightly.NightlyConfig(tables=(str(tmp_path / "d"),), state=state)
    with pytest.raises(LeaseHeld, match=r"run night-1, since .* delete .*lock.json if that run is dead"):
        nightly.run_nightly(cfg)
    def training(job):
        raise RuntimeError("trained")

    monkeypatch.setattr(nightly, "run_training", training)
    with pytest.raises(RuntimeError, match="trained"):  # stale: taken over, and released after the night
        nightly.run_nightly(dataclasses.replace(cfg, lock_ttl_s=0.0))
    assert not uris.exists(storage.join(state, "lock.json")) and len(files) == 2


def test_nothing_new_is_a_noop_that_writes_nothing(tmp_path):
    files = synthetic_tables.write_synthetic_tables(str(tmp_path / "d"), 50, shards=2, dim=8)
    state = str(tmp_path / "state")
    storage.write_json({"shards": nightly.shard_sizes(files), "run": "r0"}, storage.join(state, "manifest.json"))
    before = sorted(p.name for p in Path(state).iterdir())
    result = nightly.run_nightly(nightly.NightlyConfig(tables=(str(tmp_path / "d"),), state=state))
    assert result.decision == "noop" and "no new shards among 2" in result.reason
    assert sorted(p.name for p in Path(state).iterdir()) == before


def test_failed_night_releases_the_lock_keeps_pointer_and_watermark_and_is_retried(tmp_path, monkeypatch):
    """The failure path: training dies (here: the error Ray Train would raise)."""
    files = synthetic_tables.write_synthetic_tables(str(tmp_path / "d"), 60, shards=2, dim=8)
    state = str(tmp_path / "state")
    pointer = {"model": "s3://b/models/v1", "version": 1, "run": "r0"}
    storage.write_json(pointer, storage.join(state, "production.json"))
    tried: list[tuple[str, ...]] = []

    def dying_training(job):
        tried.append(job.tables)
        raise RuntimeError("TrainingFailedError: worker 0 died")

    monkeypatch.setattr(nightly, "run_training", dying_training)
    cfg = nightly.NightlyConfig(tables=(str(tmp_path / "d"),), state=state)
    for _night in range(2):
        with pytest.raises(RuntimeError, match="worker 0 died"):
            nightly.run_nightly(cfg)
        assert not uris.exists(storage.join(state, "lock.json"))  # released
        assert nightly.read_pointer(state) == pointer  # production untouched
        assert storage.read_json(storage.join(state, "manifest.json")) is None  # watermark not moved
        assert nightly.read_history(state) == []
    assert tried == [tuple(sorted(files))] * 2  # the same new shards, retried the next night


# --- the schedules --------------------------------------------------------------------------------------------
def _entrypoint_args(command: str, subcommand: str) -> list[str]:
    """The flags of a job command line ``python -m pipelines.cli <subcommand> ...``."""
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "pipelines.cli", subcommand], argv[:4]
    return argv[4:]


def test_kuberay_and_cron_entrypoints_are_valid_job_commands():
    from pipelines.cli import NIGHTLY, command_parser, train_config
    from pipelines.commands.flags import from_args

    docs = {p.name: list(yaml.safe_load_all(p.read_text())) for p in (ROOT / "infra/kuberay").glob("*.yaml")}
    rayjob = docs["rayjob-nightly.yaml"][0]
    cron = docs["raycronjob-nightly.yaml"][0]
    assert rayjob["kind"] == "RayJob" and cron["kind"] == "RayCronJob"
    assert cron["spec"]["jobTemplate"] == rayjob["spec"], "raycronjob-nightly.yaml drifted from rayjob-nightly.yaml"
    cfg = from_args(command_parser("nightly").parse_args(_entrypoint_args(rayjob["spec"]["entrypoint"], "nightly")),
                    NIGHTLY)
    assert cfg.state.startswith("s3://") and cfg.scale.use_gpu and cfg.metric == "cider"
    train_job = docs["rayjob-train.yaml"][0]
    tcfg = train_config(command_parser("train").parse_args(_entrypoint_args(train_job["spec"]["entrypoint"],
                                                                            "train")))
    assert tcfg.model == "clipcap-mlp" and tcfg.scale.num_workers == 4 and tcfg.run.max_failures == 3
    # The Kubernetes CronJob creates RayJobs from a ConfigMap holding rayjob-nightly.yaml, never overlapping.
    cronjob = next(d for d in docs["cronjob-nightly.yaml"] if d["kind"] == "CronJob")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid" and len(cronjob["spec"]["schedule"].split()) == 5
    volumes = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"]
    assert volumes[0]["configMap"]["name"] == "clipcap-nightly-rayjob"
    # The plain-cluster cron line runs the same job with flags the job accepts.
    line = next(ln for ln in (ROOT / "infra/cluster/nightly.cron").read_text().splitlines()
                if ln.strip() and not ln.startswith("#"))
    fields = line.split(None, 5)
    assert len(fields[:5]) == 5 and "flock -n" in fields[5]
    cmd = fields[5].split(" -- ", 1)[1].split(">>")[0]
    from_args(command_parser("nightly").parse_args(_entrypoint_args(cmd, "nightly")), NIGHTLY)
    launcher = yaml.safe_load((ROOT / "infra/cluster/clipcap-aws.yaml").read_text())
    assert launcher["head_node_type"] in launcher["available_node_types"]


# --- nights on the real local Ray cluster and S3 server ------------------------------------------------------------
def _night(s3_uri: str, **train_kw) -> nightly.NightlyConfig:
    hp = {"epochs": 1, "batch_size": 32, "lr": 1e-2, "warmup_steps": 5, "max_caption_tokens": 16, **train_kw}
    return nightly.NightlyConfig(
        tables=(storage.join(s3_uri, "embeddings"),), state=storage.join(s3_uri, "nightly"), initial_model="tiny",
        train=TrainConfig(**hp), run=RunOptions(log_every=5, max_failures=0),
        scale=ScaleConfig(num_workers=1, cpus_per_worker=0.5), heldout_fraction=0.15, heldout_max=150,
        metric="cider", tolerance=0.05)


def _etag(uri: str) -> str:
    fs, path = uris.filesystem(uri)
    return str(fs.info(path).get("ETag") or fs.info(path)["size"])


@pytest.mark.slow  # `make test-slow`: out of `make test`, which must stay well under 20 min on 2 cores
@pytest.mark.integration
def test_nights_promote_noop_promote_refuse(ray_cluster, s3_uri):
    def add_shards(n, start, first):
        synthetic_tables.write_synthetic_tables(s3_uri, n, shards=1, dim=32, start=start, first_shard=first)

    add_shards(500, 0, 0)
    add_shards(500, 500, 1)
    state = storage.join(s3_uri, "nightly")

    # Night 1: nothing in production -> the candidate is promoted.
    r1 = nightly.run_nightly(_night(s3_uri))
    assert r1.decision == "promoted" and "no production model yet" in r1.reason and len(r1.new_shards) == 2
    p1 = nightly.read_pointer(state)
    assert p1["model"] == r1.candidate and p1["version"] == 1 and p1["previous"] is None
    heldout_tag = _etag(storage.join(state, "heldout.parquet"))

    # Night 2: no new shard -> no-op: no training, nothing written.
    time.sleep(1.1)
    r2 = nightly.run_nightly(_night(s3_uri))
    assert r2.decision == "noop" and r2.candidate is None
    assert nightly.read_pointer(state) == p1 and len(nightly.read_history(state)) == 1
    assert len(storage.list_files(storage.join(state, "candidates"), "/model/config.json", recursive=True)) == 1

    # Night 3: a new shard -> warm start from production + replay of older rows -> better -> promoted.
    add_shards(500, 1000, 2)
    r3 = nightly.run_nightly(_night(s3_uri))
    assert r3.decision == "promoted", r3.reason
    assert r3.new_shards == (storage.join(s3_uri, "embeddings/synthetic/attr-proj/part-00002.parquet"),)
    rec3 = nightly.read_history(state)[-1]
    assert rec3["training"]["init"] == p1["model"] and len(rec3["training"]["tables"]) == 2
    assert 0.3 < rec3["training"]["fraction"] <= 0.6  # ~1 replayed row per new row (500 new vs 1000 old)
    # Same fixed held-out set: production's metrics tonight equal its own metrics from night 1.
    assert rec3["production_metrics"] == pytest.approx(r1.candidate_metrics)
    assert _etag(storage.join(state, "heldout.parquet")) == heldout_tag
    p3 = nightly.read_pointer(state)
    assert p3["version"] == 2 and p3["previous"]["model"] == p1["model"] and p3["reason"] == r3.reason

    # Night 4, through the CLI: a sabotaged candidate (absurd learning rate) is refused (exit code 3); the
    # pointer stays.
    from pipelines.cli import main

    add_shards(300, 1500, 3)
    night = _night(s3_uri)
    argv = ["nightly", "--input", *night.tables, "--state", night.state, "--initial-model", "tiny",
            "--epochs", "1", "--batch-size", "32", "--lr", "20", "--warmup-steps", "0", "--max-caption-tokens", "16",
            "--max-failures", "0", "--workers", "1", "--cpus-per-worker", "0.5", "--heldout-fraction", "0.15",
            "--heldout-max", "150", "--metric", "cider", "--tolerance", "0.05"]
    assert main(argv) == 3
    assert nightly.read_pointer(state) == p3
    history = nightly.read_history(state)
    assert [h["decision"] for h in history] == ["promoted", "promoted", "refused"]
    assert "worse by" in history[-1]["reason"] or "not finite" in history[-1]["reason"]
    assert history[-1]["training"]["init"] == p3["model"]
    assert not uris.exists(storage.join(state, "lock.json"))
