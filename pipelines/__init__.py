"""Ray Data / Ray Train stages built on ``clipcap_core``, one package per stage over one IO layer.

``io`` (storage, schemas, imaging, sources, tables), ``download``, ``embed``, ``train``, ``clip``,
``caption``, ``demo``, ``evaluate``, ``report``; ``cli`` + ``commands`` the ``clipcap`` console script
(see ARCHITECTURE.md).
Nothing here parses argv or reads the environment on import; ``pipelines.cli`` is the console front.

The IO modules are also reachable here, lazily (``from pipelines import storage, schemas``), for code that
imports them by these names; our own code imports them from ``pipelines.io``.
"""

from pipelines._lazy import lazy_exports

_EXPORTS: dict[str, tuple[str, ...]] = {
    f"pipelines.io.{name}": () for name in (
        "imaging", "schemas", "shard_redaction", "sources", "sources_base", "sources_parquet",
        "sources_safety", "storage", "tables", "text_sources", "urlsafety",
    )
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
