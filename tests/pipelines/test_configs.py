"""clipcap_core.configs on the pipeline configs: strict keys and types, nesting, files, replace."""

from __future__ import annotations

import json

import pytest

from clipcap_core.configs import ConfigError, from_dict, load_file, replace, to_dict
from clipcap_core.encoders import EncoderConfig
from pipelines.download.job import DownloadConfig
from pipelines.embed.download_embed import EmbedJobConfig, default_job_config
from pipelines.embed.job import EmbedConfig, EmbedResources

BASE = {"input": "s3://b/raw", "output_root": "s3://b/out", "dataset": "cc3m"}


def test_nested_defaults_and_round_trip():
    cfg = from_dict(EmbedConfig, {**BASE, "encoder": {"model_name": "ViT-B-32", "pretrained": "openai"},
                                  "resources": {"num_actors": 4, "gpus_per_actor": 1}})
    assert cfg.encoder == EncoderConfig(model_name="ViT-B-32", pretrained="openai")
    assert cfg.resources.num_actors == 4 and cfg.resources.gpus_per_actor == 1.0 and cfg.resources.batch_size == 64
    assert cfg.table_uri == "s3://b/out/embeddings/cc3m/ViT-B-32-openai"
    assert from_dict(EmbedConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_unknown_keys_and_wrong_types_name_the_path():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) in resources for EmbedResources: actors"):
        from_dict(EmbedConfig, {**BASE, "resources": {"actors": 2}})
    with pytest.raises(ConfigError, match="resources.batch_size: expected an integer"):
        from_dict(EmbedConfig, {**BASE, "resources": {"batch_size": "64"}})
    with pytest.raises(ConfigError, match=r"dtype: 'bf16' is not one of \['float32', 'float16'\]"):
        from_dict(EmbedConfig, {**BASE, "dtype": "bf16"})
    with pytest.raises(ConfigError, match="missing required config key 'dataset'"):
        from_dict(EmbedConfig, {"input": "a", "output_root": "b"})
    with pytest.raises(ConfigError, match="0 = size from the cluster"):
        from_dict(EmbedResources, {"num_actors": -1})
    with pytest.raises(ConfigError, match="batch_size must be positive"):
        from_dict(EmbedResources, {"batch_size": 0})


def test_job_config_from_yaml_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("embed:\n  input: raw\n  output_root: out\n  dataset: cc3m\n"
                    "download:\n  url_list: cc3m.tsv\n  output: raw\n  columns: [caption, url]\n")
    cfg = load_file(EmbedJobConfig, path)
    assert isinstance(cfg.download, DownloadConfig) and cfg.download.columns == ("caption", "url")
    assert cfg.synthetic is None
    assert replace(cfg.embed, dtype="float16").dtype == "float16"
    with pytest.raises(ConfigError):
        replace(cfg.embed, dtype="int8")


def test_default_job_config_is_the_tiny_synthetic_default(tmp_path):
    cfg = default_job_config(tmp_path, samples=32)
    assert cfg.embed.encoder.model_name == "tiny" and cfg.synthetic is not None and cfg.synthetic.samples == 32
    assert cfg.embed.table_uri == str(tmp_path / "embeddings" / "synthetic" / "tiny")
    assert cfg.download is not None and cfg.download.header is False
    assert from_dict(EmbedJobConfig, to_dict(cfg)) == cfg
