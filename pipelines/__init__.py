"""Ray Data / Ray Train stages built on ``clipcap_core``, one package per stage over one IO layer."""
