"""The embed stages: images -> CLIP embedding tables, captions -> text-embedding tables.

``job`` the image embed stage (config, checks, Ray Data pipeline); ``output`` its table layout and per-shard
commits (``ShardCommitter``); ``stages`` its row work (tar reading, decode; no torch on import: decode tasks
import it); ``text`` the embed-text stage; ``download_embed`` download + embed as one job. The CLIP actor
(``pipelines.clip_actor``) and the per-unit committer (``pipelines.committer``) are shared with caption.

The stage's public names are re-exported here lazily (``pipelines._lazy``): importing the package imports
no submodule, so ``import pipelines.embed.<module>`` stays as light as that module.
"""

from pipelines._lazy import lazy_exports

_EXPORTS = {
    "job": (
        "EmbedConfig", "EmbedResources", "EmbedResult", "META_DIR",
        "build_dataset", "check_input", "list_shards", "pending_shards", "validate",
        "run_embed",
    ),
    "output": (
        "ShardCommitter", "build_tables", "commit_shard", "download_incomplete", "empty_uri", "errors_uri",
        "part_uri", "remove_stale_temporaries", "rows_to_keep", "unread_reason",
    ),
    "text": (
        "EmbedTextConfig", "EmbedTextResult", "run_embed_text",
    ),
    "download_embed": (
        "EmbedJobConfig", "EmbedJobResult", "default_job_config", "run_embed_job",
    ),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
