"""ClipCap training with Ray Train, and what is built on it: nightly retraining, the prefix sweep.

``job`` the driver (``TrainJobConfig``, ``run_training``); ``worker`` what its workers run; shared with
``pipelines.clip``: ``state`` (driver -> worker contract), ``setup``, ``steps``, ``checkpoints``,
``heldout``, ``runner``. ``decap`` what ``--decoder decap`` adds; ``nightly``; ``sweep``.
"""
