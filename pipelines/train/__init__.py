"""ClipCap training with Ray Train, and what is built on it: nightly retraining, the prefix sweep.

``job`` the driver (``TrainJobConfig``, ``run_training``); ``worker`` what its workers run; shared with
``pipelines.clip``: ``state`` (driver -> worker contract), ``setup``, ``steps``, ``checkpoints``,
``heldout``, ``runner``. ``decap`` what ``--decoder decap`` adds; ``nightly``; ``sweep``.

The stage's public names are re-exported here lazily (``pipelines._lazy``): importing the package imports
no submodule, so ``import pipelines.train.<module>`` stays as light as that module.
"""

from pipelines._lazy import lazy_exports

_EXPORTS = {
    "job": (
        "TrainConfig", "TrainJobConfig", "TrainJobResult", "TrainPlan", "evaluate_artifact", "plan_training",
        "run_training",
    ),
    "state": (
        "FaultConfig", "RunOptions", "RunState", "ScaleConfig", "StepPlan",
    ),
    "nightly": (
        "NightlyConfig", "NightlyResult", "run_nightly",
    ),
    "sweep": (
        "SweepConfig", "run_sweep",
    ),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
