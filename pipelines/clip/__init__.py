"""Contrastive CLIP training and evaluation (``clipcap train-clip`` / ``eval-clip``).

``job`` the driver, ``worker`` the Ray Train worker, ``data`` image-caption pairs from shards,
``evaluate`` ``eval-clip``, ``tiny`` makes the shipped tiny CLIP (``python -m pipelines.clip.tiny``),
``tiny_scenes`` the two ``scenes`` CLIPs (``python -m pipelines.clip.tiny_scenes``).
"""
