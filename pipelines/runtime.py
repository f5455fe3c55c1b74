"""The job runtime every Ray stage shares: how Ray is started, and how actors and tasks are sized.

Knobs at 0 / None are sized from the cluster. GPU: one actor per GPU, 2 threads. CPU: one single-thread actor
per core (up to 8 per node), one CPU per node left to read tasks; single-thread: Ray runs workers at nice 15.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from pipelines import console, stopping

log = logging.getLogger(__name__)

CPU_ACTORS_PER_NODE_MAX = 8  # model copies per CPU node; above 8 cores, each actor runs cores / 8 threads
GPU_ACTOR_THREADS = 2


def ensure_ray(address: str | None = None, **init_kwargs: Any) -> None:
    """Connect to Ray once: a live session, else ``address`` / ``RAY_ADDRESS``, else a local instance."""
    # lazy: ray ~0.8 s (ray.data ~2.1 s) to import (python -X importtime)
    import ray

    if ray.is_initialized():
        return
    init_kwargs.setdefault("log_to_driver", False)
    console.announce_log()  # the CLI's job log, where Ray's own output goes
    with stopping.starting_ray():  # a SIGTERM meanwhile stops the command once Ray is up
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, **init_kwargs)


@dataclass(frozen=True)
class ClusterShape:
    """What sizing needs to know of a cluster: total CPUs and GPUs, and the CPUs of each alive node that has any."""

    cpus: float
    gpus: float
    node_cpus: tuple[float, ...]

    @classmethod
    def from_ray(cls) -> ClusterShape:
        # lazy: ray ~0.8 s (ray.data ~2.1 s) to import (python -X importtime)
        import ray

        total = ray.cluster_resources()
        nodes = tuple(float(n.get("Resources", {}).get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive"))
        return cls(cpus=float(total.get("CPU", 0.0)), gpus=float(total.get("GPU", 0.0)),
                   node_cpus=tuple(c for c in nodes if c > 0) or (float(total.get("CPU", 1.0)),))


@dataclass(frozen=True)
class ActorPlan:
    """How one stage uses the cluster: its actor pool and its read/decode tasks."""

    actors: int
    cpus_per_actor: float   # Ray's reservation (scheduling), not a thread cap
    gpus_per_actor: float
    torch_threads: int      # intra-op threads each actor runs
    read_cpus: float        # reservation per read/decode task
    calls_per_actor: int = 1  # batches one actor runs at once (threads of one process, one model copy)

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_actor > 0

    def describe(self, stage: str, cluster: ClusterShape) -> str:
        device = f"{self.gpus_per_actor:g} GPU" if self.use_gpu else "CPU"
        calls = f" running {self.calls_per_actor} batches at once" if self.calls_per_actor > 1 else ""
        per = " per batch" if self.calls_per_actor > 1 else " each"
        return (f"{stage} resources: {self.actors} actor(s){calls} on {device}, {self.cpus_per_actor:g} CPU reserved "
                f"per actor and {self.torch_threads} torch thread(s){per}; read/decode tasks {self.read_cpus:g} CPU "
                f"each; cluster {cluster.cpus:g} CPU / {cluster.gpus:g} GPU on {len(cluster.node_cpus)} node(s)")

    def pool_args(self) -> dict[str, Any]:
        """``map_batches`` keywords of this plan's actor pool (size, calls, CPU / GPU) and the Arrow rows."""
        # lazy: ray ~0.8 s (ray.data ~2.1 s) to import (python -X importtime)
        import ray.data

        calls = {"max_concurrent_calls_per_actor": self.calls_per_actor, "enable_true_multi_threading": True}
        return {"compute": ray.data.ActorPoolStrategy(size=self.actors, **(calls if self.calls_per_actor > 1 else {})),
                "num_cpus": self.cpus_per_actor, "num_gpus": self.gpus_per_actor, "batch_format": "pyarrow"}


def share_process(plan: ActorPlan, cluster: ClusterShape) -> ActorPlan:
    """A several-actor CPU plan on a one-node cluster as one actor running that many batches at once: the
    model loads once. Several nodes keep one actor per core (Ray places actors, not threads)."""
    if plan.use_gpu or plan.actors < 2 or plan.calls_per_actor != 1 or len(cluster.node_cpus) != 1:
        return plan
    return replace(plan, actors=1, calls_per_actor=plan.actors, cpus_per_actor=plan.cpus_per_actor * plan.actors)


def fit(cluster: ClusterShape, plans: Sequence[ActorPlan]) -> list[ActorPlan]:
    """The pools' CPU reservations scaled down (a warning) when they and a read task exceed the cluster."""
    wanted = sum(p.actors * p.cpus_per_actor for p in plans) + plans[0].read_cpus
    if cluster.cpus <= 0 or wanted <= cluster.cpus:
        return list(plans)
    scale = cluster.cpus / wanted
    log.warning("%d actor pool(s) + a read task reserve %.2f CPUs but the cluster has %g: scaling the reservations "
                "by %.2f (torch threads per actor stay as planned)", len(plans), wanted, cluster.cpus, scale)
    return [replace(p, cpus_per_actor=p.cpus_per_actor * scale, read_cpus=p.read_cpus * scale) for p in plans]


def plan_actors(cluster: ClusterShape, *, actors: int = 0, cpus_per_actor: float = 0.0,
                gpus_per_actor: float | None = None, torch_threads: int = 0, read_cpus: float = 0.0,
                fit_cluster: bool = True) -> ActorPlan:
    """Fill every 0 / None knob from ``cluster`` (module docstring); explicit values are kept. A GPU request
    the cluster cannot hold is an error; ``fit_cluster=False``: a job with several pools fits them itself."""
    gpus = (1.0 if cluster.gpus > 0 else 0.0) if gpus_per_actor is None else float(gpus_per_actor)
    if gpus < 0 or actors < 0 or cpus_per_actor < 0 or read_cpus < 0 or torch_threads < 0:
        raise ValueError("resource settings must not be negative (0 = size from the cluster)")
    if gpus > 0:
        n = actors or max(1, int(cluster.gpus // gpus))
        if cluster.gpus < n * gpus:
            raise ValueError(f"{n} actor(s) x {gpus:g} GPU requested but the Ray cluster has {cluster.gpus:g} GPU")
        threads = torch_threads or GPU_ACTOR_THREADS
    else:
        nodes = [max(1, int(c)) for c in cluster.node_cpus] or [max(1, int(cluster.cpus))]
        n = actors or sum(min(c, CPU_ACTORS_PER_NODE_MAX) for c in nodes)
        on_node = [max(1, round(n * c / sum(nodes))) for c in nodes]  # Ray spreads the pool about evenly
        # Threads: each node's cores shared by the actors on it; the reservation leaves a read task one CPU.
        threads = torch_threads or max(1, min(c // k for c, k in zip(nodes, on_node, strict=True)))
        if not cpus_per_actor:
            cpus_per_actor = min(1.0, min((c - (read_cpus or 1.0)) / k for c, k in zip(nodes, on_node, strict=True)))
            cpus_per_actor = cpus_per_actor if cpus_per_actor > 0 else 1.0  # a 1-core node: ``fit`` scales it
    plan = ActorPlan(actors=n, cpus_per_actor=cpus_per_actor or 1.0, gpus_per_actor=gpus, torch_threads=threads,
                     read_cpus=read_cpus or 1.0)
    return fit(cluster, [plan])[0] if fit_cluster else plan


def pixel_block_bytes(rows: int, size: int | tuple[int, int]) -> int:
    """``target_max_block_size`` for one block per decoded batch, so every actor of a pool gets work."""
    height, width = (size, size) if isinstance(size, int) else size
    return max(1 << 16, int(1.2 * rows * height * width * 3))



class CallThreads:
    """Sets torch's intra-op threads to ``threads`` once in each thread that calls it (0: leave torch's)."""

    def __init__(self, threads: int):
        self.threads = threads
        self._local = threading.local()

    def __call__(self) -> None:
        if self.threads > 0 and not getattr(self._local, "done", False):
            # lazy: torch ~6.7 s to import (python -X importtime)
            import torch

            torch.set_num_threads(self.threads)
            self._local.done = True


def actor_device(use_gpu: bool, threads: int = 0) -> str:
    """Inside an actor: set torch's threads (0: default) and return its device (Ray shows only its GPUs)."""
    # lazy: torch ~6.7 s to import (python -X importtime)
    import torch

    if threads > 0:
        torch.set_num_threads(threads)  # the actor's CPU share, no more: read/decode tasks run beside it
    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
