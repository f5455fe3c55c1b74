"""train-clip on the real local Ray cluster: the gathered loss over 2 workers, kill + rerun resume, learning,
fine-tuning from a saved run, and eval-clip on the result."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clipcap_core import synthetic
from clipcap_core.clip_training import ClipModelSpec, ClipTrainConfig
from pipelines.clip.job import ClipTrainJobConfig, plan, run_clip_training
from pipelines.train.state import FaultConfig, RunOptions, ScaleConfig

pytestmark = pytest.mark.integration
MODEL = ClipModelSpec(model_name="tiny", from_scratch=True)


def _loss_worker(config: dict) -> dict:
    """Each of W workers computes open_clip's ClipLoss on its slice of one fixed global batch."""
    import ray.train

    from clipcap_core.clip_training import ClipTrainConfig, clip_loss

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    img, txt = torch.tensor(config["img"]), torch.tensor(config["txt"])
    n = len(img) // world
    hp = ClipTrainConfig(local_loss=config["local"])
    loss = clip_loss(hp, rank, world)(img[rank * n:(rank + 1) * n], txt[rank * n:(rank + 1) * n],
                                      torch.tensor(config["scale"]))
    ray.train.report({"loss": float(loss), "rank": rank})
    return {"loss": float(loss), "rank": rank}


@pytest.mark.parametrize("local", [False, pytest.param(True, marks=pytest.mark.slow)])  # local loss: make test-slow
def test_gathered_loss_over_two_workers_equals_single_process(ray_cluster, tmp_path, local):
    import ray.train
    from open_clip.loss import ClipLoss
    from ray.train.torch import TorchTrainer

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.5 * torch.randn(16, 8, generator=g), dim=-1)
    scale = 20.0
    want = float(ClipLoss()(img, txt, torch.tensor(scale)))
    losses: dict[int, float] = {}

    def loop(config):  # both ranks' losses come back through a file (return values are rank 0's only)
        out = _loss_worker(config)
        with open(f"{config['dir']}/rank{out['rank']}.json", "w") as f:
            json.dump(out, f)

    TorchTrainer(loop, train_loop_config={"img": img.tolist(), "txt": txt.tolist(), "scale": scale, "local": local,
                                          "dir": str(tmp_path)},
                 scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 run_config=ray.train.RunConfig(storage_path=str(tmp_path / "runs"), name=f"loss-{local}")).fit()
    for r in (0, 1):
        losses[r] = json.loads((tmp_path / f"rank{r}.json").read_text())["loss"]
    if local:  # each rank: its rows against all gathered features; the mean over ranks is the global loss
        assert losses[0] != pytest.approx(losses[1])
        assert np.mean([losses[0], losses[1]]) == pytest.approx(want, rel=1e-5)
    else:  # every rank computes the whole global-batch loss
        assert losses[0] == pytest.approx(want, rel=1e-5) and losses[1] == pytest.approx(want, rel=1e-5)


def _job(shards: str, out: str, name: str, **kw) -> ClipTrainJobConfig:
    base = dict(shards=(shards,), output=out, name=name, model=MODEL,
                train=ClipTrainConfig(epochs=10, batch_size=32, lr=3e-3, warmup_steps=15, augment="none", seed=0),
                run=RunOptions(log_every=10, checkpoint_every=1000, eval_max_samples=200, eval_every=5,
                               max_failures=0),
                scale=ScaleConfig(num_workers=1, torch_threads=2), heldout_fraction=0.25)
    base.update(kw)
    return ClipTrainJobConfig(**base)


def test_train_clip_learns_resumes_after_a_kill_and_fine_tunes(ray_cluster, tmp_path):
    from clipcap_core.encoders import EncoderConfig
    from pipelines.clip.evaluate import EvalClipConfig, evaluate_clip

    shards = tmp_path / "shards"
    synthetic.write_webdataset(shards, 640, seed=3, shard_size=160)
    out = str(tmp_path / "runs")
    job = _job(str(shards), out, "learn", fault=FaultConfig(crash_at_step=20, marker=str(tmp_path / "crash.json")))
    with pytest.raises(Exception):  # noqa: B017 - the worker dies and max_failures=0 fails the run
        run_clip_training(job)
    assert (tmp_path / "crash.json").exists()
    result = run_clip_training(job)  # the rerun resumes from the epoch-1 checkpoint
    kinds = [(r["kind"], r["step"]) for r in result.history]
    assert ("resume", plan(job).steps_per_epoch) in kinds and plan(job).mode == "memory"
    steps = [r["step"] for r in result.history if r["kind"] == "step"]
    assert steps == sorted(set(steps)) and result.history[-1]["step"] == plan(job).total_steps
    untrained = evaluate_clip(EvalClipConfig(encoder=EncoderConfig(model_name="tiny-random"), shards=(str(shards),),
                                             part="heldout", heldout_fraction=0.25))
    trained = evaluate_clip(EvalClipConfig(encoder=EncoderConfig(model_name="tiny", pretrained=result.weights),
                                           shards=(str(shards),), part="heldout", heldout_fraction=0.25))
    # ~150 steps of 32 pairs from scratch: far above the untrained model (which is at chance, ~1/150)
    assert trained["retrieval"]["i2t_r1"] > max(0.1, 5 * untrained["retrieval"]["i2t_r1"])
    assert trained["retrieval"]["i2t_r1"] == pytest.approx(result.metrics["heldout_i2t_r1"], abs=0.02)

    # fine-tune from the saved weights with the image tower locked: it starts from them and keeps the tower;
    # with augmentation the data streams through Ray Data tasks (the path for sets that do not fit in memory)
    from safetensors.torch import load_file

    ft_job = _job(str(shards), out, "finetune", model=ClipModelSpec(model_name="tiny", pretrained=result.weights),
                  train=ClipTrainConfig(epochs=1, batch_size=32, lr=1e-3, warmup_steps=1, lock_image=True,
                                        augment="crop"))
    assert plan(ft_job).mode == "stream"
    ft = run_clip_training(ft_job)
    before, after = load_file(result.weights), load_file(ft.weights)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))
    assert not torch.equal(before["token_embedding.weight"], after["token_embedding.weight"])
    card = (tmp_path / "runs" / "finetune" / "model" / "README.md").read_text()
    assert result.weights in card and "heldout_i2t_r1" in card
