"""The download stage: URL lists -> webdataset shards with img2dataset (``job``)."""
