"""Bulk captioning: image archives -> caption tables + errors table.

``job`` config, checks, the Ray Data pipeline; ``stages`` read+decode tasks and the decoding actors (no
torch on import: read tasks import it); ``output`` the output layout and committer. The CLIP actor
(``pipelines.clip_actor``) and the per-unit committer (``pipelines.committer``) are shared with embed.

The stage's public names are re-exported here lazily (``pipelines._lazy``): importing the package imports
no submodule, so ``import pipelines.caption.<module>`` stays as light as that module.
"""

from pipelines._lazy import lazy_exports

_EXPORTS = {
    "job": (
        "CaptionConfig", "CaptionSummary", "Plan", "ResourceOptions", "build_dataset", "caption_archive",
        "check_output_outside_input", "prepare",
    ),
    "output": (
        "resolve_table",
    ),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
