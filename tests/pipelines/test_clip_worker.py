"""pipelines.clip.job's in-memory batches: seeded per epoch, and groups of consecutive pairs (a scene and its
hard-negative twin) stay together in one batch when ``train.group_size`` asks for it."""

from __future__ import annotations

import numpy as np
import pytest

from clipcap_core import scenes
from clipcap_core.clip_training import ClipModelSpec, ClipTrainConfig
from pipelines.clip.job import ClipTrainJobConfig, memory_batches, plan


def _job(tmp_path, group_size: int, **kw) -> ClipTrainJobConfig:
    return ClipTrainJobConfig(shards=(str(tmp_path / "shards"),), output=str(tmp_path / "runs"),
                              model=ClipModelSpec(model_name="tiny-scenes", from_scratch=True),
                              train=ClipTrainConfig(epochs=2, batch_size=8, augment="none", group_size=group_size),
                              heldout_fraction=0.0, **kw)


@pytest.mark.parametrize("group_size", [1, 2])
def test_memory_batches_keep_groups_together(tmp_path, group_size):
    scenes.write_webdataset(tmp_path / "shards", 48, seed=2, shard_size=24, twins=True)
    job = _job(tmp_path, group_size)
    p = plan(job)
    assert p.mode == "memory" and p.total_steps == 2 * (48 // 8)
    rows = {bytes(px): i for i, px in enumerate(np.stack([np.asarray(s.image) for s in
                                                          scenes.generate(48, seed=2, twins=True)]))}
    batches = [[rows[bytes(px)] for px in b["pixels"].numpy()] for b in memory_batches(job, p, 0, 1, 0, "cpu")]
    assert len(batches) == p.total_steps and sorted(sum(batches[:6], [])) == list(range(48))
    together = all(b[j] % 2 == 0 and b[j + 1] == b[j] + 1 for b in batches for j in range(0, 8, 2))
    assert together == (group_size == 2)  # shuffled rows split twins; groups of 2 never do
    assert batches[:6] != batches[6:]  # a new permutation each epoch


def test_group_size_needs_in_memory_data_without_a_heldout_split(tmp_path):
    with pytest.raises(ValueError, match="group_size"):
        ClipTrainConfig(batch_size=8, group_size=3)
    for bad in ({"heldout_fraction": 0.05}, {"data": "stream"}):
        with pytest.raises(ValueError, match="heldout_fraction 0"):
            ClipTrainJobConfig(**{**_job(tmp_path, 2).__dict__, **bad})
