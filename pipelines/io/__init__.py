"""The one IO layer every stage stands on: storage, schemas, input sources, embedding tables.

``storage`` fsspec helpers (atomic table writes, JSON, listing); ``schemas`` column names, pyarrow schemas,
Parquet metadata keys; ``sources`` / ``sources_base`` / ``sources_safety`` / ``sources_parquet`` input
listing, partitioning and archive readers;
``text_sources`` caption corpora -> parts; ``tables`` reading embedding tables for training; ``urlsafety`` URL
redaction and fetch policy; ``shard_redaction`` rewrites img2dataset shards holding signed URLs.

Import the modules themselves (``from pipelines.io import storage``); nothing is re-exported.
"""
