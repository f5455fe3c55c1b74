"""The typed driver -> worker training contract (plans, run state) and the shared step loop, without Ray."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from clipcap_core.configs import ConfigError, from_dict, to_dict
from clipcap_core.presets import preset_config
from pipelines.clip.job import ClipTrainPlan
from pipelines.runtime import ClusterShape
from pipelines.train.job import TrainPlan
from pipelines.train.state import RunOptions, RunState, ScaleConfig, StepPlan, StreamSpec
from pipelines.train.steps import WorkerRun, run_steps


@pytest.mark.parametrize("plan", [
    TrainPlan(files=("a.parquet", "b.parquet"), replay=("old.parquet",), dim=24, model_config=preset_config("tiny"),
              n_train=150, total_steps=15, epoch_ends=(5, 10), stream_start_epoch=1, stream_first_step=5),
    ClipTrainPlan(shards=("s/0.tar",), mode="memory", n_train=96, total_steps=9, epoch_ends=(3, 6), steps_per_epoch=3),
    RunState(step=7, epoch=1, attempt=2, history=[{"kind": "resume", "step": 4, "epoch": 1, "attempt": 2}]),
    StreamSpec(rows=1024, prefetch_batches=1, shuffle_buffer=512, dtypes={"embedding": "float32", "tokens": "int64"}),
])
def test_plans_and_state_round_trip_and_refuse_unknown_keys(plan):
    data = to_dict(plan)
    assert from_dict(type(plan), data) == plan
    with pytest.raises(ConfigError, match="unknown config key.*bogus"):
        from_dict(type(plan), {**data, "bogus": 1})


def test_a_plan_missing_a_key_or_of_the_wrong_type_fails_naming_it():
    data = to_dict(ClipTrainPlan(shards=("s/0.tar",), mode="stream", n_train=96, total_steps=9, epoch_ends=(3, 6)))
    with pytest.raises(ConfigError, match="missing required config key 'total_steps'"):
        from_dict(ClipTrainPlan, {k: v for k, v in data.items() if k != "total_steps"})
    with pytest.raises(ConfigError, match="mode"):
        from_dict(ClipTrainPlan, {**data, "mode": "disk"})


def test_checkpoint_state_refuses_unknown_keys():
    assert RunState.from_checkpoint({"step": 3, "epoch": 0, "attempt": 1, "history": []}) == RunState(step=3, attempt=1)
    with pytest.raises(ConfigError, match="unknown config key.*position"):
        RunState.from_checkpoint({"step": 3, "position": 1})


class _FakeRun(WorkerRun):
    """The shared loop's bookkeeping without Ray: reports are recorded, not sent."""

    def __init__(self, plan: StepPlan, opts: RunOptions, epochs: int):
        self.plan, self.opts, self.epochs, self.batch_size, self.fault = plan, opts, epochs, 2, None
        self.rank, self.world, self.state, self.metrics, self.window = 0, 1, RunState(attempt=1), {}, []
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1)], lr=0.1), lambda s: 1.0)
        self.reports: list[tuple[int, int, bool]] = []
        self.start_epoch()

    def evaluate(self) -> dict[str, float]:
        return {"val_loss": 1.0}

    def report(self, metrics, checkpoint):  # noqa: ANN001
        self.reports.append((self.state.step, self.state.epoch, checkpoint))


def test_run_steps_ends_epochs_at_planned_steps_checkpoints_and_skips_a_resumed_stream():
    plan = StepPlan(n_train=20, total_steps=9, epoch_ends=(3, 6))
    run = _FakeRun(plan, RunOptions(checkpoint_every=2, log_every=4), epochs=3)
    batches = [{"tokens": torch.zeros(2, 4)} for _ in range(12)]  # more than planned: stops at total_steps
    run_steps(run, batches, lambda b: 0.5, skip=0)
    assert run.state.step == 9 and run.state.epoch == 3
    assert run.reports == [(2, 0, True), (3, 1, True), (4, 1, True), (6, 2, True), (8, 2, True), (9, 3, True)]
    kinds = [(r["kind"], r["step"]) for r in run.state.history]
    assert kinds == [("epoch", 3), ("step", 4), ("epoch", 6), ("step", 8), ("epoch", 9)]
    assert run.state.history[-1]["val_loss"] == 1.0 and run.state.history[0]["samples"] == 6

    resumed = _FakeRun(plan, RunOptions(checkpoint_every=100), epochs=3)
    resumed.state = RunState(step=6, epoch=2, attempt=2)
    steps = []
    run_steps(resumed, batches[:6], lambda b: steps.append(resumed.state.step) or 0.5, skip=3)  # stream from step 3
    assert steps == [6, 7, 8] and resumed.state.epoch == 3
    with pytest.raises(RuntimeError, match="precedes the data stream"):
        run_steps(_FakeRun(plan, RunOptions(), epochs=3), batches, lambda b: 0.5, skip=-1)


def test_split_batches_gives_the_same_consecutive_batches_as_reading_at_the_step_size():
    """The worker reads k * batch_size rows per Ray batch and cuts them: every row once, in order, in batches
    of batch_size (a short one only where the stream's last read was short), columns kept aligned."""
    from pipelines.train.steps import split_batches

    rows = torch.arange(23)
    reads = [{"x": rows[s: s + 8], "y": -rows[s: s + 8]} for s in range(0, 23, 8)]  # 8, 8, 7 rows
    out = list(split_batches(reads, 4))
    assert [len(b["x"]) for b in out] == [4, 4, 4, 4, 4, 3]
    assert torch.equal(torch.cat([b["x"] for b in out]), rows)
    assert all(torch.equal(b["y"], -b["x"]) for b in out)
    small = [{"x": rows[:3], "y": rows[:3]}]
    assert list(split_batches(small, 4)) == small  # a read at or under the step size passes through


@pytest.mark.parametrize("batch_size, prefetch, rows, ray_prefetch", [
    (64, 4, 1024, 1),  # 16 steps per Ray batch; 4 steps of prefetch round up to one Ray batch
    (300, 8, 900, 3),  # 3 steps per Ray batch (a whole number of steps), 2,400 rows of prefetch -> 3 Ray batches
    (2048, 2, 2048, 2),  # a step larger than the read size: one step per Ray batch
])
def test_the_clipcap_stream_reads_whole_steps_per_ray_batch(tmp_path, batch_size, prefetch, rows, ray_prefetch):
    from clipcap_core.training import TrainConfig
    from pipelines.train.job import TrainJobConfig, stream_spec

    job = TrainJobConfig(tables=("t.parquet",), output=str(tmp_path), name="r",
                         train=TrainConfig(epochs=2, batch_size=batch_size), run=RunOptions(prefetch_batches=prefetch))
    plan = TrainPlan(files=("t.parquet",), dim=24, model_config=preset_config("tiny"), n_train=9000,
                     total_steps=10, epoch_ends=(5,))
    spec = stream_spec(job, plan)
    assert (spec.rows, spec.prefetch_batches, spec.drop_last) == (rows, ray_prefetch, False)
    assert spec.rows % batch_size == 0
    finished = dataclasses.replace(plan, stream_start_epoch=2)  # every epoch done: nothing to stream
    assert stream_spec(job, finished) is None


@pytest.mark.parametrize("cluster, scale, want", [
    # one 2-core node, defaults: one core to train on, one left to the read/tokenise tasks and Ray
    (ClusterShape(2.0, 0.0, (2.0,)), ScaleConfig(), (False, 1.0, 1)),
    # 16 cores, 2 workers on the node: 15 cores between them
    (ClusterShape(16.0, 0.0, (16.0,)), ScaleConfig(num_workers=2), (False, 7.5, 7)),
    # 3 nodes of 4 cores, one worker per node
    (ClusterShape(12.0, 0.0, (4.0, 4.0, 4.0)), ScaleConfig(num_workers=3), (False, 3.0, 3)),
    # 2 workers on one 2-core node: half a CPU reserved each, the data tasks keep one
    (ClusterShape(2.0, 0.0, (2.0,)), ScaleConfig(num_workers=2), (False, 0.5, 1)),
    # a GPU for each worker: GPU training, 1 CPU reserved, Ray's default threads
    (ClusterShape(32.0, 2.0, (32.0,)), ScaleConfig(num_workers=2), (True, 1.0, 0)),
    # explicit values win, whatever the cluster of the moment holds (an autoscaler may add GPU nodes)
    (ClusterShape(32.0, 2.0, (32.0,)), ScaleConfig(use_gpu=False, cpus_per_worker=0.5, torch_threads=1),
     (False, 0.5, 1)),
    (ClusterShape(2.0, 0.0, (2.0,)), ScaleConfig(use_gpu=True), (True, 1.0, 0)),
])
def test_training_workers_are_sized_from_the_cluster_and_explicit_values_win(cluster, scale, want):
    from pipelines.train.runner import describe_workers, size_workers

    sized = size_workers(scale, cluster)
    assert (sized.use_gpu, sized.cpus_per_worker, sized.torch_threads) == want
    assert sized.num_workers == scale.num_workers
    if not sized.use_gpu and not scale.cpus_per_worker:  # Ray Data keeps at least a CPU per node for the stream
        per_node = -(-scale.num_workers // len(cluster.node_cpus))
        assert min(cluster.node_cpus) - per_node * sized.cpus_per_worker >= 1
    assert f"{sized.num_workers} worker(s) on {'1 GPU' if want[0] else 'CPU'}" in describe_workers(sized, cluster)


def test_too_few_gpus_for_the_workers_trains_on_cpu_and_says_how_to_use_them(caplog):
    from pipelines.train.runner import size_workers

    sized = size_workers(ScaleConfig(num_workers=4), ClusterShape(16.0, 2.0, (16.0,)))
    assert (sized.use_gpu, sized.torch_threads) == (False, 3)
    assert "do not fit the cluster's 2 GPU" in caplog.text and "--workers 2" in caplog.text


def test_negative_or_zero_gpu_scale_settings_fail_naming_them():
    with pytest.raises(ValueError, match="cpus_per_worker"):
        ScaleConfig(cpus_per_worker=-1)
    with pytest.raises(ValueError, match="gpus_per_worker"):
        ScaleConfig(gpus_per_worker=0)
