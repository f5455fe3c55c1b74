"""``clipcap report``: one self-contained HTML page about a captioning run."""
