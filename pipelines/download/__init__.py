"""The download stage: URL lists -> webdataset shards with img2dataset (``job``).

``job`` ``DownloadConfig``, ``run_download``, ``DownloadSummary``, transient-failure retries.
"""
