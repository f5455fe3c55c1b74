"""Safe image decoding for the pipeline stages: the rules live in ``clipcap_core.imaging`` (shared with
``Captioner``, which may not import ``pipelines``); this module keeps the pipeline-side import path."""

from clipcap_core.imaging import (  # noqa: F401  (re-exported)
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    decode_image,
    is_image_name,
    sixteen_to_eight,
    to_rgb,
)
