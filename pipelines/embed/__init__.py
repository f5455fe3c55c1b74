"""The embed stages: images -> CLIP embedding tables, captions -> text-embedding tables.

``job`` the image embed stage (config, checks, Ray Data pipeline); ``output`` its table layout and per-shard
commits (``ShardCommitter``); ``stages`` its row work (tar reading, decode; no torch on import: decode tasks
import it); ``text`` the embed-text stage; ``download_embed`` download + embed as one job. The CLIP actor
(``pipelines.clip_actor``) and the per-unit committer (``pipelines.committer``) are shared with caption.
"""
