"""``clipcap study prefix``: the per-setting reduction over seeds, the flags, and a real Ray Tune run of a tiny
grid (2 settings x 1 seed on a few scenes rows embedded by the shipped tiny-scenes CLIP)."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest

from pipelines.cli import command_parser, study_config
from pipelines.demo import synthetic_tables
from pipelines.train import study


def _args(argv):
    return command_parser("study").parse_args(argv)


def test_flags_reach_the_config_and_defaults_are_the_paper_grid():
    cfg = study_config(_args(["prefix", "--input", "a", "--output", "o"]))
    assert (cfg.prefix_lengths, cfg.mappings, cfg.lms, cfg.seeds) == ((1, 10, 20), ("mlp", "transformer"),
                                                                     ("frozen", "tuned"), (0, 1, 2))
    cfg = study_config(_args(["prefix", "--input", "a", "--output", "o", "--prefix-lengths", "2", "5",
                                            "--lms", "frozen", "--seeds", "7", "--epochs", "3",
                                            "--set", "model_overrides.tokenizer=word-scenes"]))
    assert cfg.prefix_lengths == (2, 5) and cfg.lms == ("frozen",) and cfg.seeds == (7,)
    assert cfg.train.epochs == 3 and cfg.model_overrides == {"tokenizer": "word-scenes"}
    with pytest.raises(ValueError, match="seeds"):
        study.StudyConfig(tables=("a",), output="o", seeds=())


def test_summary_is_mean_and_spread_over_seeds_per_setting():
    def trial(k, seed, cider):
        return {"mapping": "mlp", "prefix_length": k, "lm": "tuned", "seed": seed, "cider": cider,
                "bleu4": 0.5, "trainable_params": 10 * k, "train_rows": 9, "seconds": 2.0 + seed}

    table = study.summarize([trial(1, 0, 1.0), trial(1, 1, 1.2), trial(4, 0, 2.0), trial(4, 1, 2.0)])
    by_k = {r["prefix_length"]: r for r in table}
    assert by_k[1]["seeds"] == 2 and by_k[1]["cider_mean"] == pytest.approx(1.1)
    assert by_k[1]["cider_std"] == pytest.approx(math.sqrt(0.02))  # sample std of 1.0, 1.2
    assert by_k[4]["cider_std"] == 0.0 and by_k[4]["trainable_params"] == 40 and by_k[1]["seconds_mean"] == 2.5
    assert by_k[1]["meteor_mean"] is None  # a metric no trial reported stays empty, not 0
    s = study.spreads(table)
    assert s["between_settings"] == pytest.approx(math.sqrt((1.1 - 1.55) ** 2 + (2.0 - 1.55) ** 2))
    assert s["over_seeds"] == pytest.approx(math.sqrt(0.02) / 2)
    md = study.format_table(table)
    # BLEU-1..3 and METEOR absent, BLEU-4 50 ± 0, ROUGE-L absent, CIDEr 110 ± 14.14 (x100, as papers print them)
    assert "| mlp | 1 | tuned | 2 | - | - | - | 50.00 ± 0.00 | - | - | 110.00 ± 14.14 | - | 2.50 ± 0.71 | 10 |" in md
    assert "between settings (std of the setting means): 63.64; over seeds (mean of the settings' std): 7.07" in md


@pytest.mark.integration
def test_tiny_study_trains_each_setting_and_seed_on_ray_tune(ray_cluster, tmp_path):
    """Two settings x one seed, one epoch on 160 scenes rows: every number in the table comes out of a trial
    (parameter counts of the models each setting builds, metrics of its own captions, CLIPScore by tiny-scenes)."""
    from clipcap_core.model import build_model, trainable_parameters
    from clipcap_core.training import TrainConfig
    from pipelines.io import tables
    from pipelines.train.setup import load_tokenizer_for, resolve_model_config

    files = synthetic_tables.write_scenes_tables(str(tmp_path / "d"), 160)
    cfg = study.StudyConfig(tables=tuple(files), output=str(tmp_path / "out"), name="s", prefix_lengths=(1, 3),
                            mappings=("mlp",), lms=("tuned",), seeds=(0,), tokenize="simple",
                            metrics=("bleu", "rouge", "cider"),  # no METEOR: no JVM start per trial
                            model_overrides={"tokenizer": "word-scenes"}, heldout_fraction=0.2, trial_cpus=0.5,
                            train=TrainConfig(epochs=1, batch_size=16, lr=3e-3, warmup_steps=2))
    trials, table = study.run_prefix_study(cfg)
    assert [(r["prefix_length"], r["seeds"]) for r in table] == [(1, 1), (3, 1)]
    info = tables.inspect_tables(files)
    for row in table:
        model_cfg = resolve_model_config("tiny", {"tokenizer": "word-scenes", "mapping.prefix_length":
                                                  row["prefix_length"], "lm.freeze": False}, info)
        model = build_model(model_cfg, load_tokenizer_for("tiny", model_cfg))
        assert row["trainable_params"] == sum(p.numel() for p in trainable_parameters(model))
        assert all(row[f"{m}_mean"] is not None and row[f"{m}_mean"] >= 0 for m in study.METRICS if m != "meteor")
        assert row["meteor_mean"] is None  # not asked for
        assert row["train_rows"] + trials[0]["heldout_rows"] == 160
    assert all(isinstance(t["example"], str) and t["seconds"] > 0 for t in trials)
    out = tmp_path / "out" / "s"
    assert pq.read_table(out / "table.parquet").num_rows == 2 and pq.read_table(out / "trials.parquet").num_rows == 2
    assert (out / "prefix.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "table.md").read_text().count("| mlp |") == 2
