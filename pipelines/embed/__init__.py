"""The embed stages: images -> CLIP embedding tables, captions -> text-embedding tables."""
