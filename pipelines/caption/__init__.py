"""Bulk captioning: image archives -> caption tables + errors table."""
