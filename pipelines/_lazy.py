"""Lazy re-exports for the stage packages (PEP 562): ``from pipelines.embed import run_embed`` imports
``pipelines.embed.job`` on first use, not when the package is imported.

Eager re-exports would make ``import pipelines.embed.stages`` (what a Ray decode task runs) import the whole
stage and with it torch / open_clip (~8 s of CPU per worker process); ``tests/core/test_preprocess.py``
checks.
A name not in the table raises ``AttributeError``, so ``from pipelines.embed import stages`` still finds the
submodule.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, tuple[str, ...]]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``; ``exports`` maps a submodule (relative, ``"job"``, or
    absolute, ``"pipelines.io.storage"``) to the names taken from it (empty: the submodule itself, under its
    last name)."""
    where: dict[str, tuple[str, str | None]] = {}
    for module, names in exports.items():
        target = module if "." in module else f"{package}.{module}"
        if names:
            where.update((name, (target, name)) for name in names)
        else:
            where[module.rsplit(".", 1)[-1]] = (target, None)

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        target, attr = where[name]
        module = importlib.import_module(target)
        return module if attr is None else getattr(module, attr)

    def __dir__() -> list[str]:
        return sorted(set(where) | set(vars(sys.modules[package])))

    return __getattr__, __dir__

