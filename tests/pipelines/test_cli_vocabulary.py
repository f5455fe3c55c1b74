"""One flag vocabulary across ``clipcap`` commands: ``--input``, ``--output``, ``--model`` (the captioning model),
``--clip`` / ``--clip-pretrained``; no abbreviations; an unknown flag gets a "did you mean"; a missing required
input names its flag."""

from __future__ import annotations

import pytest

from pipelines.cli import main


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
