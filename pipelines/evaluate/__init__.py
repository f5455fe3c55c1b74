"""``clipcap evaluate``: captions against references with COCO metrics (pycocoevalcap), CLIPScore and
RefCLIPScore (the captioner's own CLIP), written as per-image Parquet + summary JSON.
"""
