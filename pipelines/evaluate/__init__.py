"""``clipcap evaluate``: captions against references with COCO metrics (pycocoevalcap), CLIPScore and
RefCLIPScore (the captioner's own CLIP), written as per-image Parquet + summary JSON.

- ``inputs``: predictions / references in our and COCO formats, id matching.
- ``images``: image embeddings for CLIPScore (embedding tables or images, through ``pipelines.io.sources``).
- ``run``: ``EvaluateConfig``, ``run_evaluate``, ``format_table``.
The scoring itself is ``clipcap_core.evaluation`` (also used by training, nightly and the sweep).
"""
