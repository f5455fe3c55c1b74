"""Safe decoding: every awkward mode becomes upright 8-bit RGB; every bad input is an ImageDecodeError."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clipcap_core.imaging import ImageDecodeError, decode_image, is_image_name, to_rgb
from tests.pipelines.image_zoo import bad_images, good_images


@pytest.mark.parametrize("name", sorted(good_images()))
def test_good_images_decode_to_rgb(name):
    img = decode_image(good_images()[name])
    assert img.mode == "RGB" and img.size[0] > 0


def test_alpha_is_composited_on_white_and_cmyk_is_red():
    good = good_images()
    assert decode_image(good["rgba.png"]).getpixel((3, 3)) == (255, 255, 255)
    assert decode_image(good["palette.png"]).getpixel((3, 3)) == (0, 255, 0)  # index 1 is opaque green
    r, g, b = decode_image(good["cmyk.jpg"]).getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60


def test_sixteen_bit_pngs_are_scaled_not_clipped():
    gray = decode_image(good_images()["gray16.png"])
    assert gray.getpixel((0, 0)) == (200, 200, 200)  # 51400 / 257
    rgb = decode_image(good_images()["rgb16.png"])
    r, g, b = rgb.getpixel((0, 0))
    assert r == 255 and g == 0 and b in (128, 129)


def test_exif_orientation_is_applied():
    img = decode_image(good_images()["rotated.jpg"])
    assert img.size == (20, 40)  # stored 40x20, orientation 6 = rotate 90 deg clockwise
    top = np.asarray(img)[2, 10]
    assert top[0] > 200 and top[2] < 60  # the red left half is now on top


@pytest.mark.parametrize("name", sorted(bad_images()))
def test_bad_images_raise_decode_error(name):
    with pytest.raises(ImageDecodeError):
        decode_image(bad_images()[name])


def test_error_messages_say_why():
    bad = bad_images()
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(bad["empty.jpg"])
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_image(bad["notes.txt"])
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(bad["bomb-small.png"])
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(bad["bomb.png"])
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(bad["truncated.jpg"])


def test_pixel_limit_is_a_parameter():
    data = good_images()["rgb.jpg"]  # 32 x 24 = 768 pixels
    assert decode_image(data, max_pixels=768).size == (32, 24)
    with pytest.raises(ImageDecodeError, match="769|768"):
        decode_image(data, max_pixels=767)


def test_jpeg_draft_downscales_but_stays_at_least_the_target():
    big = Image.new("RGB", (1600, 1200), (10, 200, 10))
    import io

    buf = io.BytesIO()
    big.save(buf, format="JPEG")
    img = decode_image(buf.getvalue(), draft_size=(224, 224))
    assert 224 <= min(img.size) < 1200


def test_to_rgb_float_mode_and_name_check():
    f = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), mode="F")
    assert to_rgb(f).getpixel((0, 0)) == (128, 128, 128)
    assert is_image_name("a/b.JPG") and not is_image_name("a/b.txt") and not is_image_name("jpg")
