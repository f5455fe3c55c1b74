"""The config layer of the ``clipcap`` commands (``flags``); the commands are in ``pipelines.cli``."""
