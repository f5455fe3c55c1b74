"""Contrastive CLIP training and evaluation (``clipcap train-clip`` / ``eval-clip``).

``job`` the driver, ``worker`` the Ray Train worker, ``data`` image-caption pairs from shards,
``evaluate`` ``eval-clip``, ``tiny`` makes the shipped tiny CLIP (``python -m pipelines.clip.tiny``),
``tiny_scenes`` the two ``scenes`` CLIPs (``python -m pipelines.clip.tiny_scenes``).

The stage's public names are re-exported here lazily (``pipelines._lazy``): importing the package imports
no submodule, so ``import pipelines.clip.<module>`` stays as light as that module.
"""

from pipelines._lazy import lazy_exports

_EXPORTS = {
    "job": (
        "ClipTrainJobConfig", "ClipTrainResult", "run_clip_training",
    ),
    "evaluate": (
        "EvalClipConfig", "evaluate_clip",
    ),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
