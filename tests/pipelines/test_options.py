"""The one config layer (``pipelines.commands.flags``) that every command uses: file < flags < --set."""

from __future__ import annotations

import argparse

import pytest

from clipcap_core.configs import ConfigError
from pipelines.commands import flags as options


def _caption_args(argv: list[str]) -> argparse.Namespace:
    from pipelines.cli import command_parser

    return command_parser("caption").parse_args(argv)


def test_file_then_flags_then_set_each_win_over_the_one_before(tmp_path):
    from pipelines.cli import caption_config as config_from_args

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("input: in\noutput: out\nmodel: m\ndecoding: {beam_size: 3, top_k: 7}\n"
                        "resources: {stages: split, clip_batch_size: 8}\n")
    cfg = config_from_args(_caption_args(["--config", str(cfg_file), "--beam-size", "4", "--set", "decoding.top_k=9",
                                          "--set", "resources.clip_batch_size=16", "--clip-batch-size", "12"]))
    assert (cfg.decoding.beam_size, cfg.decoding.top_k) == (4, 9)  # flag over file; --set over file
    assert cfg.resources.clip_batch_size == 16 and cfg.resources.stages == "split"  # --set over flag; file kept
    with pytest.raises(ConfigError, match="decoding.*unknown|unknown.*bogus"):
        config_from_args(_caption_args(["--config", str(cfg_file), "--set", "decoding.bogus=1"]))
    with pytest.raises(ConfigError, match="stages"):  # a value the dataclass refuses: one line, not a traceback
        config_from_args(_caption_args(["--config", str(cfg_file), "--set", "resources.stages=both"]))


def test_bad_files_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        options.load_file(str(bad))
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="list.json must hold a mapping"):
        options.load_file(str(listing))
    with pytest.raises(ConfigError, match="does not exist"):
        options.load_file(str(tmp_path / "missing.yaml"))
    big = tmp_path / "big.json"
    big.write_text('{"a": "' + "x" * options.MAX_CONFIG_BYTES + '"}')
    with pytest.raises(ConfigError, match="larger than"):
        options.load_file(str(big))
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        options.apply_sets({}, ["novalue"])
    assert options.load_file(None) == {} and options.load_file(str(_empty(tmp_path))) == {}


def _empty(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    return p


@pytest.mark.parametrize("command", ["caption", "embed", "embed-text", "download", "train", "train-clip", "nightly",
                                     "sweep"])
def test_every_config_command_takes_config_and_set(command):
    from pipelines.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    flags = {s for a in sub._actions for s in a.option_strings}
    assert {"--config", "--set"} <= flags, command
