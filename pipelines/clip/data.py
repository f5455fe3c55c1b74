"""Image-caption pairs for CLIP training and evaluation, from img2dataset webdataset shards (any fsspec URI)."""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import posixpath
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from clipcap_core import imaging, uris
from clipcap_core.encoders import _open_clip
from clipcap_core.imaging import ImageResizer, PreprocessSpec
from pipelines.io import schemas, sources, storage, tables

log = logging.getLogger(__name__)
ROWS_PER_BLOCK = 256


def list_shards(roots: str | Sequence[str]) -> list[str]:
    """Webdataset ``.tar`` shards under each URI (a folder, searched recursively, or a file), sorted."""
    out: list[str] = []
    for uri in [roots] if isinstance(roots, str) else list(roots):
        if uri.endswith(".tar"):
            if not uris.exists(uri):
                raise FileNotFoundError(f"shard not found: {uri}")
            out.append(uri)
            continue
        found = [u for u in storage.list_files(uri, ".tar", recursive=True)
                 if not any(p.startswith(("_", ".")) for p in posixpath.relpath(u, uri).split("/")[:-1])]
        if not found:
            raise FileNotFoundError(f"no webdataset shards (*.tar) under {uri}")
        out += found
    return sorted(dict.fromkeys(out))


def _sidecar_keys(shard: str) -> list[str] | None:
    """Keys of the successful samples from img2dataset's ``<shard>.parquet`` (None if absent/unusable)."""
    side = shard[: -len(".tar")] + ".parquet"
    if not uris.exists(side):
        return None
    try:
        fs, path = uris.filesystem(side)
        with fs.open(path, "rb") as f:
            t = pq.read_table(f, columns=[schemas.KEY, "status"])
    except Exception:  # noqa: BLE001 - a sidecar we cannot use: fall back to the tar itself
        return None
    return [k for k, s in zip(t.column(schemas.KEY).to_pylist(), t.column("status").to_pylist(), strict=True)
            if s == "success" and k]


def shard_keys(shard: str) -> list[str]:
    """Sample keys of a shard: img2dataset's sidecar when present, else a pass over the tar's member names."""
    keys = _sidecar_keys(shard)
    if keys is not None:
        return keys
    return [k for k, group, err in sources.webdataset_samples(shard) if err is None and "txt" in group]


def count_pairs(shards: Sequence[str], split: tables.Split) -> int:
    return sum(int(split.mask(keys).sum()) for keys in map(shard_keys, shards) if keys)


@dataclass(frozen=True, kw_only=True)
class PairPrep:
    """Row work of the data tasks (picklable): model input size, tokenizer, augmentation, split."""

    model_name: str  # open_clip name (its tokenizer and context length)
    size: int
    interpolation: str = "bicubic"
    augment: str = "crop"  # "crop" (training) | "none" (open_clip's eval resize + centre crop)
    crop_scale: tuple[float, float] = (0.9, 1.0)
    seed: int = 0
    split: tables.Split = tables.Split()
    max_pixels: int = imaging.DEFAULT_MAX_PIXELS

    def resizer(self) -> Any:
        return ImageResizer(PreprocessSpec(size=self.size, mean=(0.0,) * 3, std=(1.0,) * 3,
                                           interpolation=self.interpolation))

    def crop(self, image: Any, key: str, epoch: int) -> np.ndarray:
        """Seeded RandomResizedCrop to ``size`` (params depend on seed, epoch and key only)."""
        rng = random.Random(int.from_bytes(hashlib.blake2b(f"{self.seed}:{epoch}:{key}".encode(),
                                                           digest_size=8).digest(), "little"))
        w, h = image.size
        for _ in range(10):  # torchvision's RandomResizedCrop.get_params, with our own seeded RNG
            area = w * h * rng.uniform(*self.crop_scale)
            ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = int(round((area * ratio) ** 0.5)), int(round((area / ratio) ** 0.5))
            if 0 < cw <= w and 0 < ch <= h:
                x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
                break
        else:
            cw, ch, x, y = w, h, 0, 0
        out = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=(x, y, x + cw, y + ch))
        return np.asarray(out.convert("RGB"), dtype=np.uint8)


def iter_shard_pairs(shard: str, prep: PairPrep, epoch: int = 0, resizer: Any = None
                     ) -> Iterator[tuple[str, np.ndarray, str]]:
    """(key, pixels uint8 (S, S, 3), caption) of the shard's pairs in ``prep.split``; bad samples skipped."""
    resizer = resizer or prep.resizer()
    skipped = 0
    for key, group, error in sources.webdataset_samples(shard):
        caption = group.get("txt", b"").decode("utf-8", "replace").strip() if error is None else ""
        image = next((v for ext, v in group.items() if imaging.is_image_name(f"x.{ext}")), None)
        if error is not None or not caption or image is None:
            skipped += 1
            continue
        if not prep.split.mask([key])[0]:
            continue
        try:
            img = imaging.decode_image(image, max_pixels=prep.max_pixels)
        except (imaging.ImageDecodeError, OSError, ValueError):
            skipped += 1
            continue
        pixels = prep.crop(img, key, epoch) if prep.augment == "crop" else resizer(img)
        yield key, pixels, caption
    if skipped:
        log.warning("%s: %d sample(s) skipped (no caption, no image, undecodable or unsafe member)", shard, skipped)


@functools.lru_cache(maxsize=4)
def _tokenizer(model_name: str) -> Any:
    return _open_clip().get_tokenizer(model_name)  # SimpleTokenizer: loads its BPE table once per process


def read_pairs(batch: dict[str, np.ndarray], prep: PairPrep) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data ``map_batches`` function: rows ``{"shard", "epoch"}`` -> blocks of ``{"pixels", "tokens"}``."""
    resizer, tokenize = prep.resizer(), _tokenizer(prep.model_name)
    for shard, epoch in zip(batch["shard"], batch["epoch"], strict=True):
        pix: list[np.ndarray] = []
        caps: list[str] = []
        for _key, pixels, caption in iter_shard_pairs(str(shard), prep, int(epoch), resizer):
            pix.append(pixels)
            caps.append(caption)
            if len(pix) == ROWS_PER_BLOCK:
                yield {"pixels": np.stack(pix), "tokens": tokenize(caps).numpy().astype(np.int64)}
                pix, caps = [], []
        if pix:
            yield {"pixels": np.stack(pix), "tokens": tokenize(caps).numpy().astype(np.int64)}


def stream_pairs(items: Sequence[tuple[str, int]], prep: PairPrep, *, num_cpus: float = 1.0) -> Any:
    """A Ray dataset over (shard, epoch) items in order, one read task per item, yielding pair blocks."""
    # lazy: ray ~0.8 s (ray.data ~2.1 s) to import (python -X importtime)
    import ray

    ds = ray.data.from_items([{"shard": s, "epoch": e} for s, e in items], override_num_blocks=max(1, len(items)))
    return ds.map_batches(read_pairs, fn_kwargs={"prep": prep}, batch_size=1, num_cpus=num_cpus,
                          batch_format="numpy")


def load_pairs(shards: Sequence[str], prep: PairPrep, max_rows: int = 0
               ) -> tuple[np.ndarray, Any, list[str]]:
    """In-process: (pixels (N, S, S, 3) uint8, tokens (N, T) int64, captions) of ``prep.split`` (0 rows: all)."""
    resizer = prep.resizer()
    pairs = itertools.chain.from_iterable(iter_shard_pairs(shard, prep, 0, resizer) for shard in shards)
    rows = list(itertools.islice(pairs, max_rows or None))
    if not rows:
        return np.zeros((0, prep.size, prep.size, 3), np.uint8), _tokenizer(prep.model_name)([]), []
    captions = [caption for *_, caption in rows]
    return np.stack([pixels for _, pixels, _ in rows]), _tokenizer(prep.model_name)(captions), captions
