"""Contrastive CLIP training and evaluation (``clipcap train-clip`` / ``eval-clip``)."""
