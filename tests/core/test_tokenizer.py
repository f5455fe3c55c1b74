"""Tokenizers: the word-level tokenizer of the tiny preset, captions ending in end-of-text, save / load."""

from __future__ import annotations

import pytest

from clipcap_core import synthetic as syn
from clipcap_core.tokenizer import (
    build_word_tokenizer,
    encode_caption,
    load_tokenizer,
    save_tokenizer,
    words_of,
)


def test_word_tokenizer_covers_the_synthetic_vocabulary():
    tok = build_word_tokenizer()
    assert tok.eos_token_id == tok.pad_token_id == 0
    assert len(tok) == len(syn.VOCABULARY) + 2
    for s in syn.generate(30, seed=3):
        ids = tok.encode(s.caption + ".", add_special_tokens=False)
        assert tok.unk_token_id not in ids
        assert len(ids) == len(words_of(s.caption)) + 1
        assert tok.decode(ids) == s.caption + "."  # no space before the full stop


def test_built_from_captions_is_deterministic_and_maps_unknown_words_to_unk():
    a = build_word_tokenizer(["A red dog.", "a blue cat"])
    b = build_word_tokenizer(["a blue cat", "A red dog."])
    assert a.get_vocab() == b.get_vocab()
    assert set(a.get_vocab()) == {"<|endoftext|>", "<unk>", "a", "red", "dog", ".", "blue", "cat"}
    assert a.encode("a green dog", add_special_tokens=False)[1] == a.unk_token_id


def test_encode_caption_appends_eos_and_truncates_keeping_it():
    tok = build_word_tokenizer()
    ids = encode_caption(tok, "two small red circles at the top", 20)
    assert ids[-1] == tok.eos_token_id and len(ids) == 8
    short = encode_caption(tok, "two small red circles at the top", 4)
    assert short == ids[:3] + [tok.eos_token_id]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_save_and_load_round_trip(tmp_path, where):
    tok = build_word_tokenizer(["one red fox", "two blue owls."])
    uri = str(tmp_path / "tok") if where == "local" else f"memory://tok-test-{tmp_path.name}"
    save_tokenizer(tok, uri)
    back = load_tokenizer(uri)
    assert back.get_vocab() == tok.get_vocab()
    assert back.eos_token_id == tok.eos_token_id and back.pad_token_id == tok.pad_token_id
    assert back.decode(back.encode("two red owls.", add_special_tokens=False)) == "two red owls."


def test_missing_tokenizer_fails_clearly(tmp_path):
    with pytest.raises(OSError, match="cannot load tokenizer"):
        load_tokenizer(str(tmp_path / "nothing-here"))
