"""Bulk captioning: image archives -> caption tables + errors table.

``job`` config, checks, the Ray Data pipeline; ``stages`` read+decode tasks and the decoding actors (no
torch on import: read tasks import it); ``output`` the output layout and committer. The CLIP actor
(``pipelines.clip_actor``) and the per-unit committer (``pipelines.committer``) are shared with embed.
"""
