"""Ray Data / Ray Train stages built on ``clipcap_core``, one package per stage over one IO layer.

``io`` (storage, schemas, sources, tables), ``download``, ``embed``, ``train``, ``clip``,
``caption``, ``demo``, ``evaluate``, ``report``; ``cli`` + ``commands`` the ``clipcap`` console script
(see ARCHITECTURE.md).
Nothing here parses argv or reads the environment on import; ``pipelines.cli`` is the console front.
"""
