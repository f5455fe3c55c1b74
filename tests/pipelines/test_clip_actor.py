"""pipelines.clip_actor: the one CLIP actor of embed, embed-text and caption, called in-process (no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from clipcap_core.encoders import EncoderConfig
from pipelines import rows
from pipelines.clip_actor import ClipActor
from pipelines.embed import stages as st
from tests.pipelines.image_zoo import good_images


@pytest.fixture(scope="module")
def actor():
    return ClipActor(EncoderConfig(), threads=1, texts=True)


def _images():
    from PIL import Image

    from clipcap_core.imaging import decode_image

    images = [decode_image(good_images()[n]) for n in ("rgb.jpg", "rotated.jpg", "cmyk.jpg")]
    return images + [Image.new("RGB", (90, 40), (20, 200, 30))]


def test_caption_rows_uint8_path_matches_the_encoder_preprocess():
    """Caption's rows: pixels bytes -> embedding bytes; rows without pixels keep their embedding."""
    import torch

    actor = ClipActor(EncoderConfig(), threads=1)  # caption's: images only
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


def test_embed_rows_get_image_and_caption_embeddings_of_good_rows_only(actor):
    """Embed's rows: pixels -> embedding, caption -> text_embedding; pixels dropped, every other column passed
    through, error rows (no pixels) get no vectors."""
    enc = actor.encoder
    pixels = np.stack([enc.resize(im) for im in _images()[:3]])
    batch = pa.table({st.SHARD: ["s"] * 3, st.INDEX: pa.array(range(3), pa.int64()), st.KEY: ["a", "b", "c"],
                      st.CAPTION: ["one red circle", "bad", None], st.ERROR: ["", "not an image", ""],
                      st.PIXELS: [pixels[0].tobytes(), b"", pixels[2].tobytes()]})
    out = actor(batch)
    assert out.column_names == [st.SHARD, st.INDEX, st.KEY, st.CAPTION, st.ERROR, rows.EMBEDDING,
                                rows.TEXT_EMBEDDING, "t_clip", "cpu_clip"]
    image, text = out.column(rows.EMBEDDING).to_pylist(), out.column(rows.TEXT_EMBEDDING).to_pylist()
    np.testing.assert_allclose(np.stack([np.frombuffer(image[i], np.float32) for i in (0, 2)]),
                               enc.encode_pixels(pixels[[0, 2]]), atol=1e-5)
    np.testing.assert_allclose(np.stack([np.frombuffer(text[i], np.float32) for i in (0, 2)]),
                               enc.encode_text(["one red circle", ""]), atol=1e-5)
    assert image[1] == b"" and text[1] == b""
    images_only = ClipActor(EncoderConfig(), threads=1)(batch)
    assert rows.TEXT_EMBEDDING not in images_only.column_names and rows.TRUNCATED not in images_only.column_names


def test_fused_caption_actor_scores_with_its_own_clip():
    """The CLIPScore text tower of the fused actor is the CLIP it embeds images with, loaded once."""
    from clipcap_core.decoding import DecodeConfig
    from pipelines.caption.stages import ClipCaptionStage

    stage = ClipCaptionStage(EncoderConfig(), "tiny", DecodeConfig(max_length=4), threads=1)
    assert isinstance(stage.clip, ClipActor) and stage.caption.scorer.encoder is stage.clip.encoder
