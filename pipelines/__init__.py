"""Ray Data / Ray Train stages built on ``clipcap_core``: download, embed, train, nightly, caption, evaluate.

Nothing here parses argv or reads the environment on import; ``pipelines.cli`` is the console front.
"""
