"""clip_data: pairs from webdataset shards through the safe member reader, key-hash split, seeded crop."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from clipcap_core import synthetic
from pipelines.clip import data as clip_data
from pipelines.io import tables


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _png(sample) -> bytes:
    buf = io.BytesIO()
    sample.image.save(buf, format="PNG")
    return buf.getvalue()


def test_pairs_skip_hostile_and_incomplete_samples(tmp_path):
    good = list(synthetic.generate(3, seed=2))
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tf:
        for s in good[:2]:
            _add(tf, f"{s.key}.png", _png(s))
            _add(tf, f"{s.key}.txt", s.caption.encode())
        _add(tf, "../escape.png", _png(good[2]))      # unsafe path: refused, never read
        _add(tf, "../escape.txt", b"evil caption")
        _add(tf, "nocap.png", _png(good[2]))         # image without caption: not a pair
        _add(tf, "broken.png", b"not a png")          # undecodable image: skipped
        _add(tf, "broken.txt", b"a caption")
    prep = clip_data.PairPrep(model_name="tiny", size=64, augment="none", split=tables.Split(part="all"))
    pairs = list(clip_data.iter_shard_pairs(str(path), prep))
    assert [(k, c) for k, _, c in pairs] == [(s.key, s.caption) for s in good[:2]]
    assert all(p.shape == (64, 64, 3) and p.dtype == np.uint8 for _, p, _ in pairs)
    assert clip_data.shard_keys(str(path)) == [good[0].key, good[1].key, "broken"]  # keys with a caption


def test_split_and_counts_agree_with_the_key_hash(tmp_path):
    synthetic.write_webdataset(tmp_path, 120, seed=4, shard_size=50)
    shards = clip_data.list_shards(str(tmp_path))
    assert len(shards) == 3
    held = tables.Split(part="heldout", heldout_fraction=0.3)
    train = tables.Split(part="train", heldout_fraction=0.3)
    n_held, n_train = clip_data.count_pairs(shards, held), clip_data.count_pairs(shards, train)
    assert n_held + n_train == 120 and 15 < n_held < 60
    prep = clip_data.PairPrep(model_name="tiny", size=64, augment="none", split=held)
    pixels, tokens, caps = clip_data.load_pairs(shards, prep)
    assert len(caps) == n_held == len(pixels) == tokens.shape[0]
    with pytest.raises(FileNotFoundError, match="no webdataset shards"):
        clip_data.list_shards(str(tmp_path / "empty"))


def test_crop_is_seeded_by_epoch_and_key():
    img = next(synthetic.generate(1, seed=0)).image
    prep = clip_data.PairPrep(model_name="tiny", size=64, augment="crop", crop_scale=(0.5, 0.6), seed=1)
    a, b = prep.crop(img, "k1", 0), prep.crop(img, "k1", 0)
    assert np.array_equal(a, b) and a.shape == (64, 64, 3)
    assert not np.array_equal(a, prep.crop(img, "k1", 1))  # another epoch, another crop
