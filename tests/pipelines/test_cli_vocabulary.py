"""One flag vocabulary across ``clipcap`` commands: ``--input``, ``--output``, ``--model`` (the captioning model),
``--clip`` / ``--clip-pretrained``; the old spellings work for one release with a warning; no abbreviations;
an unknown flag gets a "did you mean"; a missing required input names its flag."""

from __future__ import annotations

import pytest

from pipelines.cli import command_parser, main

# command -> [(new flag, old flag, values)]
RENAMED = {
    "download": [("--input", "--url-list", ["u.tsv"])],
    "embed": [("--output", "--output-root", ["o"]), ("--clip", "--model", ["ViT-B-32"]),
              ("--clip-pretrained", "--pretrained", ["openai"])],
    "embed-text": [("--output", "--output-root", ["o"]), ("--clip", "--model", ["ViT-B-32"]),
                   ("--clip-pretrained", "--pretrained", ["openai"])],
    "demo": [("--output", "--root", ["d"])],
    "import-reference": [("--output", "--out", ["a"]), ("--clip", "--clip-model", ["tiny"])],
    "train": [("--input", "--tables", ["t1", "t2"])],
    "nightly": [("--input", "--tables", ["t1"])],
    "sweep": [("--input", "--tables", ["t1"])],
    "train-clip": [("--input", "--shards", ["s"]), ("--clip", "--model", ["tiny"]),
                   ("--clip-pretrained", "--pretrained", ["w.safetensors"])],
    "eval-clip": [("--clip", "--model", ["tiny"]), ("--clip-pretrained", "--pretrained", ["w"])],
    "evaluate": [("--clip", "--clip-model", ["ViT-B-32"])],
    "report": [("--input", "--captions", ["c"]), ("--output", "--out", ["r.html"])],
}
BASE = {"import-reference": ["ckpt.pt"], "evaluate": ["--predictions", "p", "--references", "r", "--output", "o"]}
CASES = [(cmd, new, old, values) for cmd, rows in RENAMED.items() for new, old, values in rows]


@pytest.mark.parametrize(("command", "new", "old", "values"), CASES, ids=[f"{c}{o}" for c, _, o, _ in CASES])
def test_old_spelling_warns_once_and_parses_as_the_new_flag(command, new, old, values, capsys):
    parser = command_parser(command)
    base = BASE.get(command, [])
    with_new = parser.parse_args([*base, new, *values])
    assert capsys.readouterr().err == ""
    with_old = command_parser(command).parse_args([*base, old, *values])
    warning = capsys.readouterr().err.splitlines()
    assert len(warning) == 1 and old in warning[0] and new in warning[0] and "deprecated" in warning[0]
    assert vars(with_old) == vars(with_new)


@pytest.mark.parametrize("command", ["embed", "train", "download", "sweep", "train-clip"])
def test_old_and_new_spellings_give_the_same_config(command):
    from importlib import import_module

    from pipelines.cli import COMMANDS

    module = import_module(COMMANDS[command])
    required = {"embed": ["--input", "i", "--dataset", "d"], "download": ["--output", "o"],
                "train": ["--output", "o", "--name", "n"], "sweep": ["--output", "o"],
                "train-clip": ["--output", "o", "--name", "n"]}[command]
    new = [*required, *(a for new, _, values in RENAMED[command] for a in (new, *values))]
    old = [*required, *(a for _, old, values in RENAMED[command] for a in (old, *values))]
    cfg_new = module.config_from_args(command_parser(command).parse_args(new))
    cfg_old = module.config_from_args(command_parser(command).parse_args(old))
    assert cfg_new == cfg_old


def test_flags_are_not_abbreviated_and_an_unknown_flag_gets_a_suggestion(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["embed", "--input", "i", "--outp", "o"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --outp (did you mean --output" in err and "--output-root" not in err
    assert len(err.splitlines()) == 2  # the error and where the flags are listed, not the whole usage
    with pytest.raises(SystemExit):
        main(["caption", "--inptu", "x"])
    assert "--inptu (did you mean --input" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "flag"), [(["caption", "--output", "o", "--model", "m"], "--input"),
                                            (["embed", "--output", "o"], "--input"),
                                            (["train", "--output", "o"], "--input"),
                                            (["report", "--output", "r.html"], "--input"),
                                            (["import-reference", "ckpt.pt"], "--output")])
def test_a_missing_required_input_names_its_flag(argv, flag, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"clipcap {argv[0]}: error: {flag} is required"), err
