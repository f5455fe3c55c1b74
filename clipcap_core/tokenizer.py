"""Tokenizers: GPT-2 family ones by hub name / local dir / URI, the tiny word-level one, CLIP's BPE."""

from __future__ import annotations

import functools
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, CLIPTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from clipcap_core import scenes, synthetic
from clipcap_core.uris import local_copy, upload_dir

EOS = "<|endoftext|>"
UNK = "<unk>"
WORD = "word"  # tokenizer source name of the built-in word-level tokenizer
WORD_SCENES = "word-scenes"  # the word-level tokenizer over the scenes world's vocabulary
CLIP_BPE = "clip-bpe"  # tokenizer source name of CLIP's BPE vocabulary
# The word-level vocabulary of the world each shipped CLIP was trained on (a tiny preset on its tables)
WORD_TOKENIZER_OF_CLIP = {"tiny": WORD, "tiny-scenes": WORD_SCENES, "tiny-scenes-gapped": WORD_SCENES}
_WORD_RE = re.compile(r"\w+|[^\w\s]")


def words_of(text: str) -> list[str]:
    """Split like the word-level tokenizer does (lower-cased words and single punctuation marks)."""
    return _WORD_RE.findall(text.lower())


def build_word_tokenizer(captions: Iterable[str] | None = None, *, words: Sequence[str] | None = None,
                         min_count: int = 1) -> PreTrainedTokenizerBase:
    """Word-level fast tokenizer: ids 0/1 are ``<|endoftext|>`` (eos, pad), ``<unk>``, then sorted words."""
    if words is None:
        if captions is None:
            words = synthetic.VOCABULARY
        else:
            counts = Counter(w for c in captions for w in words_of(c))
            words = [w for w, n in counts.items() if n >= min_count]
    vocab = {w: i for i, w in enumerate([EOS, UNK, *sorted(set(words) - {EOS, UNK})])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_WORD_RE.pattern), behavior="isolated")])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words, no space before '.'
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=EOS, unk_token=UNK)


@functools.lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocabulary, merges) of open_clip's bundled CLIP BPE file, special tokens named as OpenAI's CLIP does."""
    # lazy: open_clip + torch ~12.6 s to import (python -X importtime)
    from open_clip.tokenizer import SimpleTokenizer

    st = SimpleTokenizer()
    names = {st.sot_token_id: "<|startoftext|>", st.eot_token_id: "<|endoftext|>"}
    vocab = {names.get(i, token): i for token, i in st.encoder.items()}
    return vocab, sorted(st.bpe_ranks, key=st.bpe_ranks.__getitem__)


def start_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The token every caption starts with: the tokenizer's bos when it is not also its eos (CLIP), else None."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and bos != tokenizer.eos_token_id else None


def prepare(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make sure the tokenizer has an eos token and uses it as pad (GPT-2 ships without a pad token)."""
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no end-of-text (eos) token; captions must end with one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """A built-in tokenizer (``word``, ``word-scenes``, ``clip-bpe``) or one by hub name, directory or URI."""
    if source == WORD:
        return build_word_tokenizer()
    if source == WORD_SCENES:
        return build_word_tokenizer(words=scenes.VOCABULARY)
    if source == CLIP_BPE:  # an HF CLIPTokenizer (end-of-text is eos and pad; text keeps ' .')
        vocab, merges = _clip_bpe()
        return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), clean_up_tokenization_spaces=False)
    try:
        with local_copy(source) as local:  # a hub name or local directory is used as it is
            return prepare(AutoTokenizer.from_pretrained(str(local)))
    except OSError as exc:
        raise OSError(f"cannot load tokenizer {source!r} (hub name, local directory or URI): {exc}") from exc


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, uri: str) -> None:
    """Save tokenizer files (``save_pretrained`` layout) under ``uri`` (local path or fsspec URI)."""
    with tempfile.TemporaryDirectory(prefix="clipcap-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        upload_dir(tmp, uri)


def encode_caption(tokenizer: PreTrainedTokenizerBase, caption: str, max_tokens: int) -> list[int]:
    """Ids of ``caption`` (after the start token, if any) and eos, at most ``max_tokens`` (eos kept last)."""
    start = start_token_id(tokenizer)
    head = [] if start is None else [start]
    ids = tokenizer.encode(caption, add_special_tokens=False)[: max_tokens - 1 - len(head)]
    return [*head, *ids, tokenizer.eos_token_id]
