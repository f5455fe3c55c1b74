"""The embedded-default end-to-end run (``clipcap demo``) and its steps.

``run`` the step list and ``run_demo``; ``train``, ``caption``, ``decap`` its steps;
``synthetic_tables`` attribute-labelled embedding tables for tests and benchmarks.

The stage's public names are re-exported here lazily (``pipelines._lazy``): importing the package imports
no submodule, so ``import pipelines.demo.<module>`` stays as light as that module.
"""

from pipelines._lazy import lazy_exports

_EXPORTS = {
    "run": (
        "DemoConfig", "DemoResult", "STEPS", "ray_address", "run_demo", "step_caption", "step_decap",
        "step_embed", "step_report", "step_train",
    ),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
