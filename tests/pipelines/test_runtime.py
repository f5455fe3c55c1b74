"""The sizing rules of ``pipelines.runtime.plan_actors`` (pure: a cluster description in, a plan out)."""

from __future__ import annotations

import pytest

from pipelines.runtime import ClusterShape, plan_actors


def test_cpu_default_is_one_single_thread_actor_per_core_leaving_a_cpu_for_decoding():
    plan = plan_actors(ClusterShape(2.0, 0.0, (2.0,)))
    # 2 x 0.5 CPU reserved + 1 for a decode task; 1 torch thread each (a 2-thread actor stalls when Ray's own
    # processes take a core for a moment)
    assert (plan.actors, plan.cpus_per_actor, plan.torch_threads, plan.read_cpus, plan.use_gpu) == (2, 0.5, 1, 1.0,
                                                                                                     False)
    assert plan.actors * plan.cpus_per_actor + plan.read_cpus == 2.0
    plan = plan_actors(ClusterShape(48.0, 0.0, (16.0, 16.0, 16.0)))
    assert (plan.actors, plan.torch_threads, plan.cpus_per_actor) == (24, 2, 1.0)  # 8 per node, 2 threads each
    plan = plan_actors(ClusterShape(12.0, 0.0, (4.0, 8.0)))
    assert (plan.actors, plan.torch_threads, plan.cpus_per_actor) == (12, 1, 0.75)  # the 4-core node: 3 of 4 CPUs
    plan = plan_actors(ClusterShape(1.0, 0.0, (1.0,)))
    assert plan.actors == 1 and plan.cpus_per_actor + plan.read_cpus == pytest.approx(1.0)  # scaled to fit


def test_gpu_default_is_one_actor_per_gpu_and_requests_must_fit():
    plan = plan_actors(ClusterShape(32.0, 4.0, (16.0, 16.0)))
    assert (plan.actors, plan.gpus_per_actor, plan.cpus_per_actor, plan.torch_threads) == (4, 1.0, 1.0, 2)
    assert plan_actors(ClusterShape(32.0, 4.0, (16.0, 16.0)), gpus_per_actor=0.5).actors == 8
    assert not plan_actors(ClusterShape(32.0, 4.0, (16.0, 16.0)), gpus_per_actor=0).use_gpu  # CPU on request
    with pytest.raises(ValueError, match="3 actor.*1 GPU"):
        plan_actors(ClusterShape(8.0, 1.0, (8.0,)), actors=3)


def test_explicit_values_win_and_oversized_reservations_are_scaled():
    plan = plan_actors(ClusterShape(16.0, 0.0, (16.0,)), actors=3, cpus_per_actor=2.0, torch_threads=5, read_cpus=0.5)
    assert (plan.actors, plan.cpus_per_actor, plan.torch_threads, plan.read_cpus) == (3, 2.0, 5, 0.5)
    plan = plan_actors(ClusterShape(2.0, 0.0, (2.0,)), actors=2, cpus_per_actor=1.0)
    assert 2 * plan.cpus_per_actor + plan.read_cpus == pytest.approx(2.0) and plan.torch_threads == 1
    with pytest.raises(ValueError, match="negative"):
        plan_actors(ClusterShape(2.0, 0.0, (2.0,)), torch_threads=-1)
    text = plan.describe("embed", ClusterShape(2.0, 0.0, (2.0,)))
    assert "2 actor(s) on CPU" in text and "2 CPU / 0 GPU on 1 node(s)" in text


def test_one_node_cpu_plans_share_one_actor_process_and_the_rest_keep_theirs():
    """embed's CPU default on one node: the single-thread actors become concurrent calls of one actor (one model
    load), with the same cores at work and the same total reservation; GPU, several nodes, one actor and
    already-shared plans are left as they are."""
    from pipelines.embed.job import EmbedResources
    from pipelines.runtime import share_process

    one = ClusterShape(2.0, 0.0, (2.0,))
    plan = share_process(plan_actors(one), one)
    assert (plan.actors, plan.calls_per_actor, plan.torch_threads, plan.cpus_per_actor, plan.read_cpus) == (
        1, 2, 1, 1.0, 1.0)
    assert share_process(plan, one) == plan
    big = ClusterShape(16.0, 0.0, (16.0,))
    plan = share_process(plan_actors(big), big)
    assert (plan.actors, plan.calls_per_actor, plan.torch_threads, plan.cpus_per_actor) == (1, 8, 2, 8.0)
    assert "1 actor(s) running 8 batches at once on CPU" in plan.describe("embed", big)
    args = plan.pool_args()
    assert args["compute"].max_concurrent_calls_per_actor == 8 and args["compute"].enable_true_multi_threading
    for cluster in (ClusterShape(48.0, 0.0, (16.0, 16.0, 16.0)), ClusterShape(32.0, 4.0, (16.0, 16.0)),
                    ClusterShape(1.0, 0.0, (1.0,))):
        assert share_process(plan_actors(cluster), cluster) == plan_actors(cluster)
    assert plan_actors(one).pool_args()["compute"].max_concurrent_calls_per_actor is None
    # embed shares on its own default, but not when the user asked for a number of actors
    assert EmbedResources().plan(one).calls_per_actor == 2
    assert (EmbedResources(num_actors=2).plan(one).actors, EmbedResources(num_actors=2).plan(one).calls_per_actor) == (
        2, 1)
