"""The download stage: URL lists -> webdataset shards with img2dataset (``job``).

``job`` ``DownloadConfig``, ``run_download``, ``DownloadSummary``, transient-failure retries.

The stage's public names are re-exported here lazily (``pipelines._lazy``): importing the package imports
no submodule, so ``import pipelines.download.<module>`` stays as light as that module.
"""

from pipelines._lazy import lazy_exports

_EXPORTS = {
    "job": (
        "DownloadConfig", "DownloadSummary", "INPUT_FORMATS", "check_urls", "detect_format",
        "img2dataset_kwargs", "is_transient", "missing_shards", "prepare_download", "read_url_list",
        "reset_shards", "run_download", "shards_to_retry", "summarize", "summary_json", "transient_failures",
    ),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
