"""pipelines.clip_actor: the one CLIP actor of embed, embed-text and caption, called in-process (no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from clipcap_core.encoders import EncoderConfig
from pipelines.clip_actor import ClipActor
from pipelines.embed import stages as st
from pipelines.io import schemas
from tests.pipelines.image_zoo import good_images


@pytest.fixture(scope="module")
def actor():
    return ClipActor(EncoderConfig(), threads=1, texts=True)


def _images():
    from PIL import Image

    from clipcap_core.imaging import decode_image

    images = [decode_image(good_images()[n]) for n in ("rgb.jpg", "rotated.jpg", "cmyk.jpg")]
    return images + [Image.new("RGB", (90, 40), (20, 200, 30))]


def test_table_adapter_uint8_path_matches_the_encoder_preprocess(actor):
    """Caption's row format: pixels bytes -> embedding bytes; rows without pixels keep their embedding."""
    import torch

    images = _images()
    pixels = [actor.encoder.resize(im).tobytes() for im in images]
    table = pa.table({"key": ["a", "b", "c", "d", "e"], "pixels": pixels[:2] + [b""] + pixels[2:],
                      "embedding": [b"", b"", np.ones(3, np.float32).tobytes(), b"", b""]})
    out = actor(table)
    assert out.column_names == ["key", "embedding", "t_clip", "cpu_clip"]
    emb = out.column("embedding").to_pylist()
    assert np.frombuffer(emb[2], np.float32).tolist() == [1.0, 1.0, 1.0]  # passed through
    ref = actor.encoder.encode_images(torch.stack([actor.encoder.preprocess(im) for im in images]))
    got = np.stack([np.frombuffer(emb[i], np.float32) for i in (0, 1, 3, 4)])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_column_adapter_embeds_images_and_captions_of_good_rows_only(actor):
    """Embed's row format: pixels (B, H, W, 3) -> image_embedding, caption -> text_embedding; pixels dropped,
    every other column passed through, error rows zeros."""
    enc = actor.encoder
    pixels = np.stack([enc.resize(im) for im in _images()[:3]])
    batch = {st.SHARD: np.array(["s"] * 3, dtype=object), st.INDEX: np.arange(3), st.KEY: np.array(["a", "b", "c"],
             dtype=object), st.CAPTION: np.array(["one red circle", "bad", None], dtype=object),
             st.ERROR: np.array(["", "not an image", ""], dtype=object), st.PIXELS: pixels}
    out = actor(batch)
    assert sorted(out) == sorted([st.SHARD, st.INDEX, st.KEY, st.CAPTION, st.ERROR, schemas.IMAGE_EMBEDDING,
                                  schemas.TEXT_EMBEDDING])
    np.testing.assert_allclose(out[schemas.IMAGE_EMBEDDING][[0, 2]], enc.encode_pixels(pixels[[0, 2]]), atol=1e-5)
    np.testing.assert_allclose(out[schemas.TEXT_EMBEDDING][[0, 2]], enc.encode_text(["one red circle", ""]),
                               atol=1e-5)
    assert not out[schemas.IMAGE_EMBEDDING][1].any() and not out[schemas.TEXT_EMBEDDING][1].any()
    images_only = ClipActor(EncoderConfig(), threads=1)(batch)
    assert schemas.TEXT_EMBEDDING not in images_only and st.TRUNCATED not in images_only


def test_fused_caption_actor_scores_with_its_own_clip():
    """The CLIPScore text tower of the fused actor is the CLIP it embeds images with, loaded once."""
    from clipcap_core.decoding import DecodeConfig
    from pipelines.caption.stages import ClipCaptionStage

    stage = ClipCaptionStage(EncoderConfig(), "tiny", DecodeConfig(max_length=4), threads=1)
    assert isinstance(stage.clip, ClipActor) and stage.caption.scorer.encoder is stage.clip.encoder
